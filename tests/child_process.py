"""Gateway child processes in the crash tests: read what they say, kill them dead."""
import asyncio
import signal


async def until_line(p: asyncio.subprocess.Process, wanted: str, timeout: float = 60) -> list[str]:
    lines = []
    while True:
        raw = await asyncio.wait_for(p.stdout.readline(), timeout)
        if not raw:
            err = (await p.stderr.read()).decode()
            raise AssertionError(f"child ended before {wanted!r}: {lines} {err}")
        lines.append(raw.decode().strip())
        if lines[-1] == wanted:
            return lines


async def kill(p: asyncio.subprocess.Process) -> None:
    if p.returncode is None:
        p.send_signal(signal.SIGKILL)
    await p.wait()
