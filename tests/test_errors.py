"""Unit tests for assetd.errors: wire codes, retryability, wire round-trips."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from assetd import errors

# DESIGN.md "Error codes": code -> retryable. Kept literal on purpose: the
# table is public interface, so a change in the code must show up here.
DESIGN_CODES: dict[str, bool] = {
    "bad_request": False,
    "malformed_uri": False,
    "unsupported_scheme": False,
    "not_allowed": False,
    "too_large": False,
    "not_found": False,
    "access_denied": False,
    "content_mismatch": False,
    "timeout": True,
    "unavailable": True,
    "integrity": True,
    "cache_full": True,
    "forbidden": False,
    "internal": True,
}


def _all_subclasses(cls: type[errors.AssetError]) -> set[type[errors.AssetError]]:
    found: set[type[errors.AssetError]] = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _all_subclasses(sub)
    return found


def _leaf_error_classes() -> list[type[errors.AssetError]]:
    """Concrete classes of the errors module: none of its own classes derive from them."""
    return [
        cls
        for cls in _all_subclasses(errors.AssetError)
        if cls.__module__ == errors.__name__
        and not [sub for sub in cls.__subclasses__() if sub.__module__ == errors.__name__]
    ]


def test_codes_match_design_table() -> None:
    """errors.CODES holds exactly the codes of DESIGN.md's table."""
    assert set(DESIGN_CODES) == set(errors.CODES)
    assert len(DESIGN_CODES) == len(errors.CODES)


@pytest.mark.parametrize(("code", "retryable"), sorted(DESIGN_CODES.items()))
def test_each_code_has_exactly_one_class(code: str, retryable: bool) -> None:
    """Each design code belongs to exactly one concrete class, with the design's retryable."""
    owners = [cls for cls in _leaf_error_classes() if cls.code == code]
    assert 1 == len(owners), owners
    cls = owners[0]
    assert cls is errors.error_class(code)
    assert retryable is cls.retryable
    err = cls("some message")
    assert code == err.code
    assert retryable is err.retryable
    assert {"code": code, "message": "some message", "retryable": retryable} == err.to_dict()


def test_no_concrete_class_outside_the_table() -> None:
    """Every concrete AssetError subclass carries a code from the design table."""
    assert set() == {cls.code for cls in _leaf_error_classes()} - set(DESIGN_CODES)


def test_error_class_unknown_code_raises_key_error() -> None:
    """error_class refuses a code it does not know."""
    with pytest.raises(KeyError):
        errors.error_class("no_such_code")


def test_config_error_is_not_an_asset_error() -> None:
    """ConfigError is a separate root: it never travels as a wire error."""
    assert not issubclass(errors.ConfigError, errors.AssetError)


@pytest.mark.parametrize("code", errors.CODES)
def test_round_trip_every_class(code: str) -> None:
    """to_dict then from_dict (through JSON) rebuilds the same class, code, message."""
    cls = errors.error_class(code)
    original = cls("the object is gone", detail="host-only detail")
    wire = json.loads(json.dumps(original.to_dict()))
    assert "detail" not in wire
    back = errors.AssetError.from_dict(wire)
    assert cls is type(back)
    assert code == back.code
    assert cls.retryable is back.retryable
    assert "the object is gone" == back.message
    assert original == back


def test_from_dict_unknown_code_keeps_code() -> None:
    """A newer daemon's code survives from_dict with its message and retryable flag."""
    err = errors.AssetError.from_dict(
        {"code": "quota_exceeded", "message": "slow down", "retryable": True}
    )
    assert "quota_exceeded" == err.code
    assert "slow down" == err.message
    assert True is err.retryable
    assert isinstance(err, errors.AssetError)
    assert {"code": "quota_exceeded", "message": "slow down", "retryable": True} == err.to_dict()


def test_from_dict_unknown_code_without_retryable_is_not_retryable() -> None:
    """An unknown code without a retryable flag is treated as not retryable."""
    err = errors.AssetError.from_dict({"code": "brand_new", "message": "m"})
    assert "brand_new" == err.code
    assert False is err.retryable


def test_from_dict_unknown_code_does_not_leak_to_class() -> None:
    """Keeping an unknown code on one instance leaves InternalError's class code alone."""
    errors.AssetError.from_dict({"code": "brand_new", "message": "m"})
    assert "internal" == errors.InternalError.code
    assert "internal" == errors.InternalError("x").code


def test_from_dict_missing_fields_defaults_to_internal() -> None:
    """A dict without a code rebuilds an internal error with an empty message."""
    err = errors.AssetError.from_dict({})
    assert errors.InternalError is type(err)
    assert "" == err.message


def test_detail_is_kept_but_not_in_message() -> None:
    """detail is stored for logs and never folded into message or str()."""
    err = errors.NotFound("object does not exist", detail="/var/cache/secret path")
    assert "/var/cache/secret path" == err.detail
    assert "object does not exist" == str(err)
    assert "/var/cache" not in json.dumps(err.to_dict())


def test_equality_by_code_and_message() -> None:
    """Errors compare equal by code and message, and hash accordingly."""
    assert errors.NotFound("a") == errors.NotFound("a")
    assert errors.NotFound("a") != errors.NotFound("b")
    assert errors.NotFound("a") != errors.AccessDenied("a")
    assert 1 == len({errors.NotFound("a"), errors.NotFound("a")})


@given(code=st.sampled_from(errors.CODES), message=st.text())
def test_round_trip_any_message(code: str, message: str) -> None:
    """Any message survives to_dict/JSON/from_dict unchanged, for every code."""
    err = errors.error_class(code)(message)
    back = errors.AssetError.from_dict(json.loads(json.dumps(err.to_dict())))
    assert message == back.message
    assert code == back.code
    assert err.retryable is back.retryable


def test_content_mismatch_message_names_both_digests_shortly() -> None:
    """content_mismatch names the pinned and the actual digest, 12 hex chars each."""
    expected, actual = "a" * 64, "b" * 64
    err = errors.ContentMismatch.for_digests(expected, actual)
    assert (
        "the object's content (sha256 bbbbbbbbbbbb...) is not the pinned content "
        "(sha256 aaaaaaaaaaaa...)"
    ) == err.message
    assert err == errors.ContentMismatch.for_digests(expected, actual)
    assert ("content_mismatch", False) == (err.code, err.retryable)
