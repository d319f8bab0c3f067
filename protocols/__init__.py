"""Wire formats, sans-I/O: bytes in, events out. No asyncio inside the codecs."""
