"""Tokens never reach a log (not in a message, an exception's repr or a traceback); token names are people."""
import io
import logging

import pytest

from gateway.ops.auth import TokenFileError, Tokens, mask_tokens_on_handlers, new_token


def _logged(emit) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    parent = logging.getLogger("feikong-test-redaction")
    parent.propagate = False
    parent.addHandler(handler)
    try:
        mask_tokens_on_handlers(parent)
        emit(logging.getLogger("feikong-test-redaction.child"))  # propagated from a logger below
    finally:
        parent.removeHandler(handler)
    return out.getvalue()


def test_a_token_in_arguments_of_any_type_is_masked():
    token = new_token()
    text = _logged(lambda log: log.warning("bad header %s from %r", token, ValueError(f"token {token}")))
    assert token not in text
    assert "bad header fk_*** from ValueError('token fk_***')" in text


def test_a_token_in_a_traceback_is_masked():
    token = new_token()

    def emit(log):
        try:
            raise PermissionError(f"refused {token}")
        except PermissionError:
            log.exception("request failed")

    text = _logged(emit)
    assert token not in text
    assert "Traceback" in text and "PermissionError: refused" in text


def test_masking_twice_adds_one_filter():
    handler = logging.StreamHandler(io.StringIO())
    logger = logging.getLogger("feikong-test-redaction-twice")
    logger.addHandler(handler)
    try:
        mask_tokens_on_handlers(logger)
        mask_tokens_on_handlers(logger)
        assert len(handler.filters) == 1
    finally:
        logger.removeHandler(handler)


def test_token_names_differing_only_in_case_are_refused(tmp_path):
    tokens = Tokens(path=tmp_path / "tokens.toml")
    tokens.add("sam", "supervisor")
    with pytest.raises(TokenFileError, match="only in case"):
        tokens.add("Sam", "operator")
    tokens.add("sam", "operator")  # the same name again replaces its token
    digest = "0" * 64
    (tmp_path / "two.toml").write_text(f'[tokens.sam]\nrole = "operator"\nsha256 = "{digest}"\n'
                                       f'[tokens.SAM]\nrole = "supervisor"\nsha256 = "{digest}"\n')
    with pytest.raises(TokenFileError, match="tokens.SAM: differs from tokens.sam only in case"):
        Tokens.load(tmp_path / "two.toml")
