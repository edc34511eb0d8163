"""Unit tests for assetd.policy: allowlists and the size cap."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import pytest

from assetd.errors import NotAllowed, TooLarge
from assetd.policy import Policy
from assetd.uri import S3Source


def test_bucket_in_allowlist_passes() -> None:
    """A bucket in allowed_buckets is accepted."""
    Policy(allowed_buckets=frozenset({"assets", "other"})).check_source(S3Source("assets", "k"))


def test_bucket_outside_allowlist_refused() -> None:
    """A bucket not in allowed_buckets raises NotAllowed naming the bucket."""
    policy = Policy(allowed_buckets=frozenset({"assets"}))
    with pytest.raises(NotAllowed) as info:
        policy.check_source(S3Source("secrets", "k"))
    assert "not_allowed" == info.value.code
    assert "secrets" in info.value.message


def test_bucket_match_is_exact() -> None:
    """Bucket matching is exact, not by prefix or substring."""
    policy = Policy(allowed_buckets=frozenset({"assets"}))
    for bucket in ("assets-private", "my-assets", "asset"):
        with pytest.raises(NotAllowed):
            policy.check_source(S3Source(bucket, "k"))


def test_empty_allowlists_allow_everything() -> None:
    """Empty bucket and prefix allowlists allow any bucket and key."""
    policy = Policy()
    for bucket, key in [("any-bucket", "k"), ("x.y.z", "deep/a/b/c"), ("abc", "é")]:
        policy.check_source(S3Source(bucket, key))


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("datasets/tp2/a.csv", True),
        ("datasets/", True),
        ("datasets-private/tp2/a.csv", False),
        ("datasets", False),
        ("Datasets/tp2/a.csv", False),
        ("other/datasets/a.csv", False),
        ("public/x", True),
    ],
)
def test_prefix_allowlist_is_plain_string_match(key: str, allowed: bool) -> None:
    """Prefixes match as plain strings: 'datasets/' does not admit 'datasets-private/'."""
    policy = Policy(allowed_prefixes=("datasets/", "public/"))
    source = S3Source("bucket", key)
    if allowed:
        policy.check_source(source)
    else:
        with pytest.raises(NotAllowed):
            policy.check_source(source)


def test_prefix_without_slash_matches_like_iam() -> None:
    """A prefix without a trailing slash also admits keys that merely start with it."""
    policy = Policy(allowed_prefixes=("datasets",))
    policy.check_source(S3Source("bucket", "datasets-private/a"))


def test_prefixes_apply_in_every_allowed_bucket() -> None:
    """Both allowlists must pass: right bucket with wrong prefix is refused, and vice versa."""
    policy = Policy(allowed_buckets=frozenset({"a-bucket", "b-bucket"}), allowed_prefixes=("p/",))
    policy.check_source(S3Source("a-bucket", "p/x"))
    policy.check_source(S3Source("b-bucket", "p/x"))
    with pytest.raises(NotAllowed):
        policy.check_source(S3Source("a-bucket", "q/x"))
    with pytest.raises(NotAllowed):
        policy.check_source(S3Source("c-bucket", "p/x"))


def test_not_allowed_message_is_deterministic() -> None:
    """The refusal message is the same for the same cause."""
    policy = Policy(allowed_prefixes=("p/",))
    messages = []
    for _ in range(2):
        with pytest.raises(NotAllowed) as info:
            policy.check_source(S3Source("bucket", "q/x"))
        messages.append(info.value.message)
    assert messages[0] == messages[1]


def test_size_limit_boundary() -> None:
    """A size equal to the cap passes; one byte more raises TooLarge."""
    policy = Policy(max_object_bytes=1000)
    policy.check_size(0)
    policy.check_size(1000)
    with pytest.raises(TooLarge) as info:
        policy.check_size(1001)
    assert "too_large" == info.value.code
    assert "1001" in info.value.message


def test_default_size_limit_is_one_gib() -> None:
    """The default cap is 1 GiB, inclusive."""
    policy = Policy()
    assert 1 << 30 == policy.max_object_bytes
    policy.check_size(1 << 30)
    with pytest.raises(TooLarge):
        policy.check_size((1 << 30) + 1)
