"""Secret scrubbing by key pattern and by value pattern.

A scrubbed value is replaced by ``[scrubbed len=N hash=XXXXXXXX]``: the length and a short
keyed hash (HMAC-SHA256 with a per-process random key unless one is configured) keep
changes comparable without making low-entropy secrets guessable from the output.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import os
import re
from collections import Counter
from collections.abc import Iterable

DEFAULT_SECRET_KEYS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "api-key",
    "auth",
    "credential",
    "cookie",
    "session",
    "csrf",
    "xsrf",
    "private_key",
    "private-key",
    "privatekey",
    "dsn",
    "signature",
    "access_key",
    "access-key",
    "jwt",
    "pwd",
)

_SCHEMES = r"(?:bearer|basic|digest|token|negotiate)"
_KEY_VALUE_TEMPLATE = r"""(?ix)
    \b(?P<key>[\w.-]*(?:{keys})[\w.-]*)      # a secret-looking name
    (?P<sep>\s*[=:]\s*|["']\s*:\s*b?|["']\s*,\s*b?)  # = or : (also 'k': v and ('k', v))
    (?P<value>
        (?:{schemes}\s+)?                    # "Authorization: Bearer xyz" hides xyz too
        (?:b?"[^"]*(?:"|$)|b?'[^']*(?:'|$)|[^\s&,;'"}}]+)  # a quote cut off at the end too
    )
"""
_SCHEME_TOKEN = re.compile(r"(?i)\b" + _SCHEMES + r"\s+([A-Za-z0-9._~+/=-]{6,})")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s:@]*:[^/\s@]+)@")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_LONG_HEX = re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])")
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_=-]{24,}")
_SEGMENT_SEPARATORS = re.compile(r"[_/+=.-]")
_MASKED = "[scrubbed len="


class Scrubber:
    """Replaces secrets in keys, values, free text and query strings."""

    def __init__(self, extra_keys: Iterable[str] = (), hash_key: bytes | None = None) -> None:
        keys = tuple(dict.fromkeys(k.lower() for k in (*DEFAULT_SECRET_KEYS, *extra_keys) if k))
        self.secret_keys = keys
        self._hash_key = hash_key if hash_key is not None else os.urandom(16)
        pattern = "|".join(re.escape(k) for k in keys)
        self._key_value = re.compile(_KEY_VALUE_TEMPLATE.format(keys=pattern, schemes=_SCHEMES))
        self.is_secret_key = functools.lru_cache(maxsize=4096)(self._is_secret_key)

    def _is_secret_key(self, key: str) -> bool:
        lowered = key.lower()
        return any(k in lowered for k in self.secret_keys)

    def mask(self, value: str | bytes) -> str:
        """The replacement for a secret ``value``: its length and a short keyed hash."""
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        digest = hmac.new(self._hash_key, raw, hashlib.sha256).hexdigest()[:8]
        return f"[scrubbed len={len(value)} hash={digest}]"

    def text(self, value: str) -> str:
        """``value`` with every secret-looking substring masked."""
        if not value:
            return value
        value = self._key_value.sub(self._mask_key_value, value)
        value = _URL_CREDENTIALS.sub(lambda m: m.group(1) + self.mask(m.group(2)) + "@", value)
        value = _SCHEME_TOKEN.sub(self._mask_scheme_token, value)
        value = _JWT.sub(lambda m: self.mask(m.group(0)), value)
        value = _LONG_HEX.sub(lambda m: self.mask(m.group(0)), value)
        return _LONG_TOKEN.sub(self._mask_if_random, value)

    def value(self, key: str, value: str) -> str:
        """``value`` as stored under ``key``: masked whole when the key looks secret."""
        if self.is_secret_key(key):
            return self.mask(value)
        return self.text(value)

    def pairs(self, items: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Scrubbed ``{key: value}`` from pairs such as headers (later duplicates are joined)."""
        result: dict[str, str] = {}
        for key, value in items:
            clean_key = self.text(key)
            clean = self.value(key, value)
            result[clean_key] = f"{result[clean_key]}, {clean}" if clean_key in result else clean
        return result

    def query(self, query_string: str) -> dict[str, str]:
        """A raw query string, parsed and scrubbed by key and value."""
        from urllib.parse import parse_qsl

        try:
            parsed = parse_qsl(query_string, keep_blank_values=True, max_num_fields=200)
        except ValueError:
            return {"<unparsable>": self.mask(query_string)}
        return self.pairs(parsed)

    def _mask_key_value(self, match: re.Match[str]) -> str:
        value = match.group("value")
        prefix = ""
        if value[:1] == "b" and value[1:2] in ("'", '"'):
            prefix, value = "b", value[1:]
        quote = value[0] if value[:1] in ("'", '"') else ""
        closed = bool(quote) and len(value) >= 2 and value[-1] == quote
        inner = value[1:-1] if closed else value[1:] if quote else value

        if inner.startswith(_MASKED):
            return match.group(0)
        end = quote if closed else ""
        return f"{match.group('key')}{match.group('sep')}{prefix}{quote}{self.mask(inner)}{end}"

    def _mask_scheme_token(self, match: re.Match[str]) -> str:
        token = match.group(1)
        # "Basic authentication required" is a sentence, "Basic dXNlcjpw..." a credential;
        # a long run of letters ("token correcthorsebatterystaple") is a passphrase.
        if token.startswith("[scrubbed") or (token.isalpha() and len(token) < 16):
            return match.group(0)

        return match.group(0)[: match.start(1) - match.start(0)] + self.mask(token)

    def _mask_if_random(self, match: re.Match[str]) -> str:
        token = match.group(0)
        return self.mask(token) if looks_random(token) else token


def looks_random(token: str) -> bool:
    """Whether ``token`` looks like generated key material rather than words or a path.

    Identifiers and paths are mostly whole words (``migrations/0042_add_user_index``);
    key material is a mix of cases and digits with few word-like segments and high entropy.
    """
    has_digit = any(c.isdigit() for c in token)
    has_letter = any(c.isalpha() for c in token)
    if not (has_digit and has_letter):
        return False
    word_chars = sum(
        len(segment)
        for segment in _SEGMENT_SEPARATORS.split(token)
        if segment.isdigit()
        or (segment.isalpha() and (segment.islower() or segment.isupper() or segment.istitle()))
        or _is_word_with_version(segment)
    )
    if word_chars * 2 >= len(token):
        return False
    counts = Counter(token)
    entropy = -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())
    return entropy >= 3.5


def _is_word_with_version(segment: str) -> bool:
    # "v2", "py311", "utf8": a lowercase word with a number after it.
    letters = segment.rstrip("0123456789")
    return bool(letters) and letters.isalpha() and letters.islower() and len(letters) >= 1
