"""The v1 MQTT contract: the published JSON Schemas are the Structs', and every example in docs/mqtt.md is
valid by its schema (checked by jsonschema, a validator no one here wrote) and by the gateway's decoder."""
import json
import re
from pathlib import Path

import jsonschema
import msgspec
import pytest

from protocols.mqtt import billing as contract

DOC = Path(__file__).resolve().parent.parent / "docs" / "mqtt.md"
EXAMPLE = re.compile(r"topic: `([^`]+)`\n```json\n(.*?)\n```", re.S)
SCHEMA_OF = {f"{contract.IN}/payments": "payment.json", f"{contract.IN}/notice-receipts": "notice-receipt.json",
             f"{contract.IN}/field-updates": "field-update.json", f"{contract.IN}/area-flags": "area-flag.json",
             f"{contract.IN}/forecasts": "forecast.json", f"{contract.IN}/tariffs": "tariff-change.json"}
DATA_SCHEMA = {"payments_applied": contract.PaymentsApplied, "relay_confirmed": contract.RelayCommand,
               "readings": contract.Readings, "balances": contract.Balances, "dead_letter": contract.DeadLetter}


def examples():
    return EXAMPLE.findall(DOC.read_text())


def validator(name: str):
    schema = json.loads((contract.SCHEMA_DIR / name).read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("name", sorted(contract.SCHEMAS))
def test_the_published_schema_files_are_generated_from_the_contract(name):
    assert (contract.SCHEMA_DIR / name).read_text() == contract.schema_text(contract.SCHEMAS[name]), \
        "run: python -m protocols.mqtt.billing --write-schemas"
    jsonschema.Draft202012Validator.check_schema(json.loads((contract.SCHEMA_DIR / name).read_text()))


def test_every_topic_has_an_example_in_the_docs():
    topics = {t for t, _ in examples()}
    assert set(contract.INBOUND) <= topics
    assert {contract.DEAD_LETTER, contract.status_topic("gw1"), contract.event_topic("payments_applied"),
            contract.event_topic("relay_confirmed"), contract.event_topic("readings"),
            contract.event_topic("balances")} <= topics


@pytest.mark.parametrize("topic,text", examples(), ids=[t for t, _ in examples()])
def test_each_example_is_valid_by_its_schema_and_by_the_gateways_decoder(topic, text):
    doc = json.loads(text)
    if topic in contract.INBOUND:
        validator(SCHEMA_OF[topic]).validate(doc)
        contract.decode(topic, text.encode())
    elif topic.startswith(contract.STATUS):
        validator("status.json").validate(doc)
        msgspec.json.decode(text, type=contract.Status)
    else:
        validator("event.json").validate(doc)
        event = msgspec.json.decode(text, type=contract.Event)
        assert contract.event_topic(event.kind) == topic
        msgspec.convert(event.data, DATA_SCHEMA[event.kind])


@pytest.mark.parametrize("topic,payload,where", [
    (f"{contract.IN}/payments", {"payment_id": "P1", "account": "A1", "amount": 50.0,
                                  "paid_at": "2026-11-25T10:00:00+08:00"}, "$.amount"),
    (f"{contract.IN}/payments", {"payment_id": "P 1", "account": "A1", "amount": "5",
                                  "paid_at": "2026-11-25T10:00:00+08:00"}, "$.payment_id"),
    (f"{contract.IN}/payments", {"payment_id": "P1", "account": "", "amount": "5",
                                  "paid_at": "2026-11-25T10:00:00+08:00"}, "$.account"),
    (f"{contract.IN}/field-updates", {"update_id": "U1", "order_id": "O1", "status": "done",
                                       "at": "2026-11-25T10:00:00+08:00"}, "$.status"),
    (f"{contract.IN}/forecasts", {"forecast_id": "F1", "area": "n", "day": "2026-11-31", "min_c": 1, "max_c": 2},
     "$.day"),
])
def test_an_invalid_message_is_refused_by_both_the_schema_and_the_decoder_saying_where(topic, payload, where):
    with pytest.raises(jsonschema.ValidationError):
        validator(SCHEMA_OF[topic]).validate(payload)
    with pytest.raises(contract.BadMessage, match=re.escape(where)):
        contract.decode(topic, json.dumps(payload).encode())


def test_money_is_exact_both_ways():
    assert contract.yuan_to_fen("0.10") == 10 and contract.yuan_to_fen("12345678.99") == 1234567899
    assert contract.fen_to_yuan(-1130) == "-11.30" and contract.fen_to_yuan(5) == "0.05"


def test_a_topic_outside_the_contract_is_refused_by_name():
    with pytest.raises(contract.BadMessage, match="no such inbound topic"):
        contract.decode(f"{contract.IN}/refunds", b"{}")
