"""The audit log's hash chain on both stores: appends link, triggers refuse UPDATE and DELETE, and verification
names the first record edited, deleted or slipped in (the tests tamper with the database directly, around the
triggers); migration 4 chains the records already there; several writers on one PostgreSQL take turns."""
import threading

import pytest

from gateway import cli
from gateway.core.control import AuditRecord
from gateway.ops import audit
from gateway.ops.audit import link_hash, verify_chain
from gateway.store import base, open_store

T0 = 1_790_000_000.0


def record(i: int) -> AuditRecord:
    return AuditRecord(T0 + i, "olga", "operator", "relay_close_requested", f"M{i}", f"reason {i}", {"i": i})


def store_with(url: str, n: int, first: int = 0):
    store = open_store(url)
    store.migrate()
    for i in range(first, first + n):
        with store.transaction():
            store.append_audit([record(i)])
    return store


def bypass_triggers(store) -> None:
    """What an attacker with the database's keys does first."""
    if store.dialect == "sqlite":
        store._execute("DROP TRIGGER audit_log_no_update")
        store._execute("DROP TRIGGER audit_log_no_delete")
    else:
        store._execute("ALTER TABLE audit_log DISABLE TRIGGER USER")


def seqs(store) -> list[int]:
    return [r[0] for r in store._query("SELECT seq FROM audit_log ORDER BY seq")]


def forge(store, seq: int, after_hash: str, i: int = 99) -> None:
    """A record with a valid hash of its own, linked to ``after_hash``, put in at ``seq``."""
    row = (T0 + i, "mallory", "admin", "adjustment", "A0", "looks legit", '{"amount_fen": 100000}')
    over = " OVERRIDING SYSTEM VALUE" if store.dialect == "postgresql" else ""
    store._execute(f"INSERT INTO audit_log (seq, at, actor, role, action, subject, reason, detail, prev_hash, hash)"
                   f"{over} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (seq, *row, after_hash, link_hash(after_hash, *row)))


def hash_of(store, seq: int) -> str:
    return store._query("SELECT hash FROM audit_log WHERE seq = ?", (seq,))[0][0]


def test_appends_link_and_verify(store_url):
    store = store_with(store_url, 5)
    with store.transaction():  # several in one transaction link in order too
        store.append_audit([record(5), record(6)])
    report = verify_chain(store)
    assert report.ok and report.records == 7 and report.head == hash_of(store, seqs(store)[-1])
    assert store.audit_head() == (7, report.head)
    assert "intact: 7 records" in report.describe()
    store.close()


def test_the_log_refuses_updates_and_deletes(store_url):
    store = store_with(store_url, 3)
    for sql in ("UPDATE audit_log SET reason = 'nothing happened' WHERE seq = 2", "DELETE FROM audit_log WHERE seq = 2"):
        with pytest.raises(Exception, match="append-only"):
            with store.transaction():
                store._execute(sql)
    if store.dialect == "postgresql":
        with pytest.raises(Exception, match="append-only"):
            with store.transaction():
                store._execute("TRUNCATE audit_log")
    assert verify_chain(store).ok and len(seqs(store)) == 3
    store.close()


@pytest.mark.parametrize("tamper,bad_seq,words", [
    ("UPDATE audit_log SET reason = 'nothing happened' WHERE seq = 3", 3, ["changed"]),  # edited
    ("DELETE FROM audit_log WHERE seq = 3", 4, ["deleted", "record 2"]),  # found at the next one
    ("DELETE FROM audit_log WHERE seq >= 4", None, ["2 record(s) missing from the end"]),  # cut off the end
])
def test_an_edited_or_deleted_record_is_found(store_url, tamper, bad_seq, words):
    store = store_with(store_url, 5)
    bypass_triggers(store)
    store._execute(tamper)
    report = verify_chain(store)
    assert not report.ok and report.bad_seq == bad_seq and all(w in report.why for w in words), report
    store.close()


def test_an_inserted_record_is_named(store_url):
    store = store_with(store_url, 3)
    # a gap in the numbering (a rolled-back transaction leaves one on PostgreSQL): room to slip one in
    if store.dialect == "sqlite":
        store._execute("UPDATE sqlite_sequence SET seq = 10 WHERE name = 'audit_log'")
    else:
        store._execute("ALTER TABLE audit_log ALTER COLUMN seq RESTART WITH 11")
    for i in (3, 4):
        with store.transaction():
            store.append_audit([record(i)])
    assert seqs(store) == [1, 2, 3, 11, 12] and verify_chain(store).ok
    forge(store, 5, hash_of(store, 3))
    report = verify_chain(store)
    assert not report.ok and report.bad_seq == 5 and "inserted" in report.why
    store.close()


def test_a_record_appended_around_the_chain_is_named(store_url):
    store = store_with(store_url, 3)
    forge(store, 4, hash_of(store, 3))  # a valid link and hash, but the head row never heard of it
    report = verify_chain(store)
    assert not report.ok and report.bad_seq == 4 and "not appended through the chain" in report.why
    store.close()


def test_migration_4_chains_the_records_already_there(store_url):
    saved = base.MIGRATIONS[:]
    del base.MIGRATIONS[3:]
    try:
        store = open_store(store_url)
        assert store.migrate() == 3
        with store.transaction():
            for i in range(4):
                r = record(i)
                store._execute("INSERT INTO audit_log (at, actor, role, action, subject, reason, detail) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)", (r.at, r.actor, r.role, r.action, r.subject, r.reason,
                                                                base._dumps(r.detail)))
        assert "schema version 3" in verify_chain(store).why
        store.close()
    finally:
        base.MIGRATIONS[:] = saved
    store = open_store(store_url)
    assert store.migrate() == 6
    with store.transaction():
        store.append_audit([record(4)])
    report = verify_chain(store)
    assert report.ok and report.records == 5
    assert [r[6] for r in store.audit_log()] == [f"reason {i}" for i in range(5)]
    store.close()


def test_writers_on_one_postgresql_take_turns_on_the_chain(pg_dsn, monkeypatch):
    store_with(pg_dsn, 0).close()  # migrated
    errors, reports = [], []
    monkeypatch.setattr(audit, "PAGE", 7)  # many pages, so appends land between them
    done = threading.Event()

    def verifier() -> None:  # verifying while they append never cries wolf
        s = open_store(pg_dsn)
        while not done.is_set():
            reports.append(verify_chain(s))
        s.close()

    def writer(k: int) -> None:
        try:
            s = open_store(pg_dsn)
            for i in range(40):
                with s.transaction():
                    s.append_audit([record(1000 * k + i), record(1000 * k + i + 500)])
            s.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    checking = threading.Thread(target=verifier)
    checking.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    checking.join()
    assert not errors
    assert len(reports) > 3 and all(r.ok for r in reports), [r for r in reports if not r.ok][:3]
    store = open_store(pg_dsn)
    report = verify_chain(store)
    assert report.ok and report.records == 240, report
    store.close()


def test_feikong_audit_verify_checks_the_store_offline(tmp_path, capsys):
    url = f"sqlite://{tmp_path / 'g.db'}"
    store_with(url, 4).close()
    assert cli.main(["audit", "verify", "--store", url]) == 0
    assert "intact: 4 records" in capsys.readouterr().out
    store = open_store(url)
    bypass_triggers(store)
    store._execute("UPDATE audit_log SET actor = 'nobody' WHERE seq = 2")
    store.close()
    assert cli.main(["audit", "verify", "--store", url]) == 1
    err = capsys.readouterr().err
    assert "broken at record 2" in err and "changed" in err
    assert cli.main(["audit", "verify", "--store", "mysql://x"]) == 2


def test_feikong_audit_verify_finds_the_store_through_the_gateway_config(tmp_path, capsys):
    store_with(f"sqlite://{tmp_path / 'g.db'}", 2).close()
    config = tmp_path / "gateway.toml"
    config.write_text('[store]\nurl = "sqlite://g.db"\n')  # relative to the config file
    assert cli.main(["audit", "verify", "--config", str(config)]) == 0
    assert "intact: 2 records" in capsys.readouterr().out
    config.write_text('[store]\nurl = 5\n')
    assert cli.main(["audit", "verify", "--config", str(config)]) == 2
    assert "url" in capsys.readouterr().err


def test_a_missing_chain_head_refuses_appends_with_the_reason(store_url):
    store = store_with(store_url, 2)
    store._execute("DELETE FROM audit_head")
    with pytest.raises(audit.ChainHeadMissing, match=r"audit chain's head \(table audit_head, row id 1\) is missing"):
        with store.transaction():
            store.append_audit([record(2)])
    assert len(seqs(store)) == 2  # nothing appended
    report = verify_chain(store)  # the check says so too, rather than fail
    assert not report.ok and "audit_head" in report.why
