"""Secret scrubbing by key pattern and by value pattern.

A scrubbed value is replaced by ``[scrubbed len=N hash=XXXXXXXX]``: the length and a short
keyed hash (HMAC-SHA256 with a per-process random key unless one is configured) keep
changes comparable without making low-entropy secrets guessable from the output.

Which names are secret (header names, query keys, env var and local names via
:meth:`Scrubber.is_secret_key`, and the ``name`` of ``name=value``, ``name: value``,
``"name": value`` and ``("name", value)`` in free text via :meth:`Scrubber.text`):

1. A name is secret when it contains, in any case, one of :data:`DEFAULT_SECRET_KEYS` or of
   the configured extra keys as a substring (``DB_PASSWORD``, ``csrftoken``, ``oauth``).
2. Otherwise it is secret when one of its segments is a short key of
   :data:`SHORT_SECRET_KEYS` (``pass pin key sig code pw otp totp hotp mfa hmac license
   bearer``, or that word plus ``s``), or is an upper-case word that ends in ``PASS``, ``PW`` or
   ``KEY`` after two or more letters, as environment variables glue them (``SSHPASS``,
   ``LDAP_BINDPW``, ``MINIO_ACCESSKEY``), unless the letters before are a word of
   :data:`HARMLESS_GLUED` (``COMPASS``, ``BYPASS``, ``MONKEY``, ``HOTKEY``).
   Segments are the runs of ASCII letters and digits between any other characters and at
   case changes: ``USER_PASS`` is ``user pass``, ``x-api-sig`` is ``x api sig``, ``userPin``
   is ``user pin``, ``PINCode`` is ``pin code``, ``key2`` is ``key 2``; ``passport``,
   ``keyboard``, ``monkey``, ``barcode``, ``keyspace`` are one segment each and never match.
3. A short-key segment does not count when the segment just before it is in
   :data:`HARMLESS_BEFORE` for that key (``status_code``, ``primary_key``, ``cache_key``,
   ``public_key``) or the segment just after it is in :data:`HARMLESS_AFTER` for that key
   or is a file extension (``key_id``, ``key_count``, ``KeyError``, ``pin_memory``,
   ``code.function``, ``key.py``). In free text a lone word before the name, separated by
   spaces, stands for the segment before it: ``status code: 500`` and ``exit code: 1`` stay
   readable, ``code: 4/0AX4`` and ``api key: abc`` are masked.

A value under a secret name is masked up to its closing quote, also when its quotes are
escaped as reprs and JSON write them (``password=\\'x\\'``, ``{\\"token\\": \\"x\\"}``, more
backslashes in nested reprs): a value opened by a run of N backslashes and a quote ends at
the next run of exactly N backslashes and the same quote. A quote with another run before
it is inside the value (``'it\\'s'``), so a value that ends in a backslash is masked up to
the next such quote or to the end of the text. A name right after a repr escape
(``\\npin``, ``\\x0bkey``) is secret when it is secret with or without the escape.
An unquoted value that opens a bracket (a list, tuple, mapping or call: ``{'password':
['x']}`` as a parsed form prints, ``password=Secret('x')``) is masked up to its matching
bracket, brackets inside its quoted parts skipped; when it never closes, or a bracket of
another kind closes it, the rest of the text is masked.

Keys that services mark with a prefix (``sk_live_``, ``ghp_``, ``xoxb-``, ``AKIA``...) are
masked wherever they appear. Three forms name a value away from it: a field's value quoted
on the line after its name, as pydantic's ``ValidationError`` writes it (``password\n  ...
input_value='x'``); a row's key in a database's error (``Key (api_token)=(x) already
exists``); and credentials before a host and port without a scheme (``user:x@host:4317``,
as gRPC writes an endpoint).

A private key in PEM is masked whole, from its ``-----BEGIN ... PRIVATE KEY-----`` line to
the ``-----END`` line of the same kind (or to the end of the text, when it was cut before
that). The text of an XML element named like a secret (``<password>x</password>``) is masked
as a ``name=value`` is; so is the password a MySQL or MariaDB client takes glued to ``-p``
(``mysql -uroot -pXYZ``, ``['mysqldump', '-pXYZ']``), up to where that command ends.

A JWT (``eyJ...``, also with the ``=`` padding AWS's load balancer writes) is masked whole
wherever it appears; a header or parameter whose whole value is a JWS or JWE (its first
segment decoding to a JSON header that names its ``alg``) is masked whole whatever its name.
A header that carries a URL (``Referer``, ``Origin``, ``X-Forwarded-Uri``, ``X-Original-Url``,
``X-Rewrite-Url``, any name ending in ``-uri``, ``-url`` or ``-path``, see
:data:`URL_HEADERS`) has its user information masked whole and its query string and
fragment scrubbed as a request's own query string is, each parameter as it decodes (see
:meth:`Scrubber.url`).

Scrubbing runs in time linear in its input, and :meth:`Scrubber.text` scans at most
:data:`MAX_SCANNED_CHARS` characters: the rest of a longer text is masked whole and marked.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable

DEFAULT_SECRET_KEYS = (
    "password",
    "passwd",
    "passphrase",
    "passcode",
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
    "passkey",
)
"""Secret when contained anywhere in a name, in any case."""

SHORT_SECRET_KEYS = (
    "pass",
    "pin",
    "key",
    "sig",
    "code",
    "pw",
    "otp",
    "totp",
    "hotp",
    "mfa",
    "hmac",
    "license",
    "licence",
    "bearer",
)
"""Secret only as a whole segment of a name (or with a plural ``s``), see the module doc."""


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_FILE_EXTENSIONS = _words(
    "py pyc pyi pyx so js mjs ts go rs rb java c h cc cpp json yaml yml toml ini cfg conf "
    "txt md html log csv pem crt der"
)
HARMLESS_BEFORE: dict[str, frozenset[str]] = {
    "code": _words(
        "status exit error err http response resp return ret result reason fault failure "
        "decline reject rejection exception exc warning event message msg grpc country zip "
        "postal post area dial phone calling currency language lang locale region state city "
        "airport iata icao iso unit product item sku tax hs bank branch swift bic char key op "
        "source src qr bar color colour type class category service plan short batch"
    ),
    "key": _words(
        "primary sort cache partition foreign range row unique composite natural surrogate "
        "shard sharding routing group grouping dedup dedupe idempotency object dict map duplicate "
        "lookup index join public pub order ordering lock queue stream topic event message "
        "msg config setting settings translation i18n label field column attr attribute "
        "property prop header redis kv registry metric tag throttle ratelimit limit "
        "counter"
    ),
    "pin": _words("gpio io led"),
    "pass": _words(
        "first second third last next prev previous final single multi render shader "
        "compile compiler optimization opt lint"
    ),
}
"""Per short key: a segment just before it that makes the name harmless."""

HARMLESS_AFTER: dict[str, frozenset[str]] = {
    "code": _words(
        "path file filepath function lineno line namespace column version owner owners "
        "name block coverage quality review gen generation generator style"
    ),
    "key": _words(
        "id ids name names type types size len length bits count counts prefix suffix "
        "space spaces path file filename error errors index idx alg algorithm version "
        "rotation format field fields func fn function code event events down up press "
        "pressed binding bindings map mapping order pattern exists"
    ),
    "pin": _words("memory mode state count index idx direction config"),
    "pass": _words("count counts rate fail through thru number num index idx name"),
    "sig": _words(
        # signal module names: SIG_DFL, SIG_IGN, SIG_BLOCK, SIG_SETMASK...
        "alg algo algorithm type version len length count fig figs dfl ign block unblock "
        "setmask err"
    ),
    "otp": _words("len length digits period interval"),
    "totp": _words("len length digits period interval enabled required"),
    "hotp": _words("len length digits counter enabled required"),
    "mfa": _words(
        "enabled disabled required enforced method methods type types status enrolled "
        "enrollment provider providers factor factors device devices count setup"
    ),
    "hmac": _words("alg algo algorithm type version len length digest header"),
    "license": _words(
        "type types name names url urls file files path expression classifier classifiers "
        "text family id ids expiry expires expiration count"
    ),
    "licence": _words("type types name names url urls file files path text id ids"),
    # OpenAPI's bearerFormat, Keycloak's bearer-only: settings, not the token.
    "bearer": _words("format only type scheme method methods"),
}
"""Per short key: a segment just after it that makes the name harmless."""

HARMLESS_GLUED: dict[str, frozenset[str]] = {
    "pass": _words("com by sur over under tres encom"),
    "key": _words("mon don tur hoc joc whis lac hot turn pub public sort primary"),
    "pw": frozenset(),
}
"""Per ending of an upper-case word (``SSHPASS``): the letters before it that make a
harmless word of it (``COMPASS``, ``MONKEY``)."""
_GLUED_NAME = re.compile(r"([A-Z]{2,})(PASS|PW|KEY)S?")

MAX_SCANNED_CHARS = 65_536
""":meth:`Scrubber.text` scans this many characters; the rest is masked whole."""
MAX_HASHED_CHARS = 4096
"""A mask's hash covers this many characters of what it replaces (its length, all of it)."""

_MAX_CACHED_KEY_CHARS = 256
_SHORT_KEY_OF = {
    **{key: key for key in SHORT_SECRET_KEYS},
    **{key + "s": key for key in SHORT_SECRET_KEYS},
}
_NAME_SEGMENT = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# Where a cut may fall without splitting a token, and how far back to look for one.
_CUT_SPACES = " \t\r\n"
_CUT_SEPARATORS = "&,;"
_CUT_CHARS = _CUT_SPACES + _CUT_SEPARATORS
_CUT_WINDOW = 256
_SUBPROTOCOL_HEADER = "sec-websocket-protocol"
URL_HEADERS = frozenset({"referer", "referrer", "origin"})
"""Headers (lower case) that carry a URL, scrubbed by :meth:`Scrubber.url`; so is any header
whose name ends in one of :data:`URL_HEADER_SUFFIXES` (``X-Forwarded-Uri``,
``X-Original-Url``, ``X-Rewrite-Url``, ``X-Envoy-Original-Path``)."""
URL_HEADER_SUFFIXES = ("-uri", "-url", "-path")
_MAX_QUERY_FIELDS = 200
# What a rewritten query parameter keeps unencoded besides letters, digits and "_.-~".
_QUERY_SAFE = "/:@!$'()*,;=?"
_AUTH_SCHEMES = frozenset({"bearer", "basic", "digest", "token", "negotiate", "authorization"})
_PROTOCOL_SEPARATORS = re.compile(r"[._+/-]")
_MAX_PROTOCOL_CHARS = 64

# Every pattern is linear: a name or token can only start where its run of characters starts
# (a lookbehind, not \b, which also matches inside runs of "a.b.c"), runs are possessive
# (*+, ++), and nothing unbounded is followed by something that could match the same chars.
_SCHEMES = r"(?:bearer|basic|digest|token|negotiate)"
_NAME_TEMPLATE = r"""(?x)
    (?<![\w.{extra}-])(?P<key>[\w.{extra}-]++)  # a whole run of name characters
    (?P<sep>\s*+[=:]\s*+|\\*+["']\s*+[:,]\s*+)  # = or : (also 'k': v, ('k', v), \'k\': v)
"""
# Where a value starts; a quoted one ends where _closing_quote says.
_VALUE = re.compile(
    r"""(?ix)
    (?P<masked>\[scrubbed\ len=\d++\ hash=[0-9a-f]{8}\])  # already masked
    | (?P<scheme>"""
    + _SCHEMES
    + r"""\s++)?    # "Authorization: Bearer xyz" hides xyz too
      (?:(?P<open>b?(?P<escape>\\*+)(?P<quote>["']))  # 'v', b'v', \'v\' (escaped by a repr)
      | (?:[^\s&,;'"}\\]++|\\++(?!["']))++)  # unquoted: up to a quote, escaped or not
    """
)
# A quote and the whole run of backslashes before it (never a part of a run, so each run is
# tried once).
_ESCAPED_QUOTE = {quote: re.compile(r"(?<!\\)(\\*+)" + quote) for quote in "'\""}
# The escapes repr writes, which it glues to the next word ("\npin=4242").
_REPR_ESCAPE = re.compile(r"[ntr]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}")
# Where a list, tuple or mapping under a secret name ends: its brackets and quotes.
_CLOSER = {"[": "]", "(": ")", "{": "}"}
_OPENING = re.compile(r"[\[({]")
_STRUCTURE = re.compile(r"""(?<!\\)(?P<escape>\\*+)(?P<quote>["'])|[\[\](){}]""")
_SCHEME_TOKEN = re.compile(r"(?i)\b" + _SCHEMES + r"\s++([A-Za-z0-9._~+/=-]{6,}+)")
_HTTP_VERSION = re.compile(r"HTTP/[0-9](?:\.[0-9])?")
_URL_CREDENTIALS = re.compile(r"(?i)(?<![a-z0-9+.-])([a-z0-9+.-]*+://)([^/\s:@]*+:[^/\s]*)@")
# The same without a scheme, before a host and port: "user:password@host:4317", as gRPC
# clients write an endpoint.
_HOST_CREDENTIALS = re.compile(
    r"(?<![A-Za-z0-9._~%+:/@-])([A-Za-z0-9._~%+-]++:)([^\s/:@]++)@"
    r"(?=(?:[A-Za-z0-9.-]++|\[[0-9A-Fa-f:.]++\]):[0-9]{1,5}(?![0-9]))"
)
# A value quoted under a field's name on the line before it, as pydantic's ValidationError
# writes one ("password\n  String should have ... [type=..., input_value='x', ...]").
_FIELD_INPUT = re.compile(
    r"(?m)^(?P<field>[^\s\n][^\n]{0,200}?)\n(?P<message>[ \t]++[^\n]*?\binput_value=)"
    r"(?P<value>\[scrubbed len=\d++ hash=[0-9a-f]{8}\]|'(?:[^'\\\n]|\\.)*+'"
    r"|\"(?:[^\"\\\n]|\\.)*+\"|[^,\]\n]*+)"
)
# Keys whose service writes a prefix on them: Stripe, GitHub, Slack, GitLab, npm, AWS access
# key ids, Google API keys.
_KNOWN_KEY = re.compile(
    r"(?<![A-Za-z0-9_])(?:"
    r"[spr]k_(?:live|test)_[0-9A-Za-z]{10,}+|gh[pousr]_[A-Za-z0-9]{36}|github_pat_\w{22,}+"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}+|glpat-[A-Za-z0-9_-]{20}|npm_[A-Za-z0-9]{36}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35})"
)
_FIELD_PARTS = re.compile(r"[.\s\[\]()>-]+")  # "user.password", "body -> password"
# A row's key in a database's error ("Key (api_token)=(x) already exists.", PostgreSQL).
_ROW_KEY = re.compile(r"\bKey \((?P<columns>[^()\n]{1,500})\)=\((?P<values>[^()\n]*+)\)")
# A JWT, also with the "=" padding an AWS load balancer writes on each segment.
_JWT = re.compile(
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}+={0,2}\.[A-Za-z0-9_-]{5,}+={0,2}"
    r"\.[A-Za-z0-9_-]*+={0,2}"
)
# A whole value made of the segments of a JWS (three) or a JWE (five), in base64url or
# base64, padded or not: a JWT when its first segment decodes to a JSON header with "alg".
_JOSE_SEGMENT = r"[A-Za-z0-9_+/-]*+={0,2}"
_JOSE_COMPACT = re.compile(
    r"[ \t]*+([A-Za-z0-9_+/-]++)={0,2}(?:\." + _JOSE_SEGMENT + r"){2}"
    r"(?:(?:\." + _JOSE_SEGMENT + r"){2})?[ \t]*+"
)
_TO_BASE64 = str.maketrans("-_", "+/")
# Where a URL's authority is: after its scheme's "//", up to its path, query or fragment.
_AUTHORITY = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*+:)?//([^/?#]*+)")
_LONG_HEX = re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}+(?![A-Za-z0-9])")
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_=-]{24,}+")
_SEGMENT_SEPARATORS = re.compile(r"[_/+=.-]")
# An RFC 4122 UUID in its canonical form is an identifier (a tenant, an order, a trace),
# not key material: its 122 random bits are no secret. Written without hyphens it is
# indistinguishable from a hex key and stays masked.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# A private key in PEM (PKCS#1, PKCS#8, encrypted, OpenSSH, PGP's armour): masked whole from
# its BEGIN line to the END line of the same kind, or to the end of the text without one.
_PRIVATE_KEY_BEGIN = re.compile(
    r"-----BEGIN (?P<kind>(?:[A-Z0-9]++ ){0,4}PRIVATE KEY(?: BLOCK)?)-----"
)
# An element named like a secret in XML (or HTML, or a SOAP body): <password>x</password>.
_XML_ELEMENT = re.compile(
    r"<(?P<name>[A-Za-z_][\w.:-]{0,63}+)(?:\s[^<>]{0,1024}+)?>(?P<value>[^<]++)</(?P=name)\s*+>"
)
# MySQL's and MariaDB's clients take the password glued to -p ("mysql -uroot -pXYZ"), in a
# command line or an argv list; what follows such a command is searched up to where the
# command ends (a new line, ;, |, &, or the list's closing bracket).
_MYSQL_COMMAND = re.compile(r"(?<![\w.-])(?:mysql|mariadb)[\w-]*+(?![\w.])")
_COMMAND_END = re.compile(r"[\n;|&\])]")
_MAX_COMMAND_CHARS = 1024
_GLUED_FLAG = re.compile(r"""(?<=[\s'",\[(])-p(?=[^\s'",\])])|(?<=[\s,\[(])-p(?=['"])""")
_SHELL_WORD_ENDS = frozenset(" \t\r\n;|&)")
MASKED = re.compile(r"\[scrubbed len=(?P<length>\d++) hash=[0-9a-f]{8}\]")
"""What :meth:`Scrubber.mask` writes, whole: a value that only begins like it is no mask."""


def _glued_value_end(text: str, flag: int, begin: int, limit: int) -> int:
    """Where the password glued to the ``-p`` at ``flag`` ends (it starts at ``begin``,
    searched up to ``limit``): in an argv element (``'-pmy pass'`` in a list's repr), at the
    element's closing quote, escaped quotes skipped; in a command line, at the end of the
    shell word, quoted parts included (``-p'pa;ss'``, ``-p'it'"'"'s'``); a quote never
    closed runs to the end of the line."""
    opener = text[flag - 1] if flag else ""
    index = begin
    if opener in "'\"":
        while index < limit and text[index] != opener:
            index += 2 if text[index] == "\\" else 1
        return min(index, limit)
    while index < limit:
        char = text[index]
        if char in _SHELL_WORD_ENDS:
            break
        if char in "'\"":
            close = text.find(char, index + 1, limit)
            if close < 0:
                line = text.find("\n", index, limit)
                return line if line >= 0 else limit
            index = close
        index += 1
    return index


class Scrubber:
    """Replaces secrets in keys, values, free text and query strings."""

    def __init__(self, extra_keys: Iterable[str] = (), hash_key: bytes | None = None) -> None:
        keys = tuple(dict.fromkeys(k.lower() for k in (*DEFAULT_SECRET_KEYS, *extra_keys) if k))
        self.secret_keys = keys
        self._hash_key = hash_key if hash_key is not None else os.urandom(16)
        # Extra keys match as substrings of a name, so their other characters ("x.weird+key")
        # must be able to belong to a name in free text too.
        extra_chars = {
            c
            for key in keys
            for c in key
            if not (c.isalnum() or c in "_.-" or c.isspace() or c in "=:'\",")
        }
        extra = "".join(re.escape(c) for c in sorted(extra_chars))
        self._name = re.compile(_NAME_TEMPLATE.format(extra=extra))
        self._substrings = re.compile("|".join(re.escape(key) for key in keys))
        self._cached_verdict = functools.lru_cache(maxsize=4096)(self._verdict)
        self._cached_looks_secret = functools.lru_cache(maxsize=4096)(self._looks_secret)
        self._cached_credential_shaped = functools.lru_cache(maxsize=4096)(self._credential_shaped)

    def is_secret_key(self, key: str) -> bool:
        """Whether values under the name ``key`` are secret (the rule is in the module doc)."""
        return self._name_verdict(key) is not False

    def mask(self, value: str | bytes) -> str:
        """The replacement for a secret ``value``: its length and a short keyed hash (of its
        first :data:`MAX_HASHED_CHARS` characters: a megabyte-long local, masked past what is
        scanned, costs no more to tell apart than that)."""
        hashed = value[:MAX_HASHED_CHARS]
        raw = hashed.encode("utf-8", "surrogatepass") if isinstance(hashed, str) else hashed
        digest = hmac.new(self._hash_key, raw, hashlib.sha256).hexdigest()[:8]
        return f"[scrubbed len={len(value)} hash={digest}]"

    def text(self, value: str, limit: int = MAX_SCANNED_CHARS) -> str:
        """``value`` with every secret-looking substring masked.

        Only the first ``limit`` characters (:data:`MAX_SCANNED_CHARS` unless told) are
        scanned; the rest is masked whole after ``[rest not scanned: ``. The scanned part
        ends at a space when one is near, so no token is split (a URL's password cut from its
        ``@`` would no longer look like one); else at a ``&``, ``,`` or ``;`` with the segment
        before it masked too (a URL's credentials may hold one); else the token the limit
        falls in is masked (at most 256 characters of it before the limit). How to bound a
        text before cutting it: scrub it with a limit, then cut what came out (see
        :func:`cut_scrubbed`).
        """
        if not value:
            return value
        if len(value) <= limit:
            return self._scrub(value)
        cut = _scan_end(value, limit)
        return f"{self._scrub(value[:cut])}[rest not scanned: {self.mask(value[cut:])}]"

    def cut_text(self, value: str) -> str:
        """``value``, a text someone else already cut short at its end (the SDK cuts span
        attributes at their length limit), scrubbed: what showed a secret there for one
        (a URL's ``@``, a closing quote) may be what was cut off, so the token the cut may
        have split is masked, as the rest of a text past :meth:`text`'s limit is."""
        if not value:
            return value
        cut = _scan_end(value, len(value))
        rest = value[cut:]
        return self.text(value[:cut]) + (f"[cut: {self.mask(rest)}]" if rest else "")

    def value(self, key: str, value: str) -> str:
        """``value`` as stored under ``key`` (a header's, a query parameter's): masked whole
        when the key looks secret or the value is a JWT (:func:`is_jwt`). A
        ``Sec-WebSocket-Protocol`` header keeps only the subprotocol names that are names (see
        :meth:`subprotocols`); a header that carries a URL (:data:`URL_HEADERS`) is scrubbed
        as one (see :meth:`url`)."""
        return self._value(key, value, urls=True)

    def _value(self, key: str, value: str, *, urls: bool) -> str:
        """:meth:`value`, reading ``key`` as a header that carries a URL only when ``urls``
        (not for a URL's own parameters: one level of URLs is read, so nesting costs
        nothing more)."""
        if self.is_secret_key(key):
            return self.mask(value)
        name = key.lower()
        if name == _SUBPROTOCOL_HEADER:
            return self.subprotocols(value)
        if is_jwt(value):
            return self.mask(value)
        if urls and (name in URL_HEADERS or name.endswith(URL_HEADER_SUFFIXES)):
            return self.url(value)
        return self.text(value)

    def url(self, value: str) -> str:
        """A URL (a ``Referer``, an ``X-Original-Url``) scrubbed: its user information
        (``user:password@``, ``token@``) masked whole, and its query string and fragment
        scrubbed as a request's own query string is (:meth:`query`): each parameter as it
        decodes, by its name and by its value (a query string of more than 200 parameters
        is masked whole). A parameter that needs no mask is kept as it was sent, one that
        does is written with its masks, the rest of it percent-encoded. The whole is then
        scrubbed as text too, so nothing :meth:`text` masks is left readable; the scheme,
        host and path stay readable unless a value pattern masks some of them. A mask
        already there is left as it is: scrubbing twice changes nothing."""
        if not value:
            return value
        rest, hash_mark, fragment = value.partition("#")
        base, question_mark, query = rest.partition("?")
        authority = _AUTHORITY.match(base)
        if authority is not None and "@" in authority.group(1):
            userinfo = authority.group(1).rpartition("@")[0]
            if not MASKED.fullmatch(userinfo):
                start = authority.start(1)
                base = f"{base[:start]}{self.mask(userinfo)}{base[start + len(userinfo) :]}"
        scrubbed = base + question_mark + self.query_string(query)
        if hash_mark:
            scrubbed += hash_mark + self.query_string(fragment)
        return self.text(scrubbed)

    def query_string(self, query_string: str) -> str:
        """A URL's raw query string (or fragment) with each parameter scrubbed as
        :meth:`query` scrubs it, kept as sent where that masks nothing."""
        if not query_string:
            return query_string
        fields = _parse_query(query_string)
        segments = query_string.split("&")
        if fields is None or len(fields) != sum(1 for segment in segments if segment):
            return self.mask(query_string)
        written: list[str] = []
        unread = iter(fields)
        for segment in segments:
            if not segment:
                written.append(segment)
                continue
            key, value = next(unread)
            scrubbed_key, scrubbed_value = self._field(key, value, urls=False)
            if MASKED.fullmatch(value):  # masked before
                scrubbed_value = value
            if scrubbed_key == key and scrubbed_value == value:
                written.append(segment)
                continue
            raw_key, equals, raw_value = segment.partition("=")
            if scrubbed_key != key:
                raw_key = _requoted(scrubbed_key)
            if scrubbed_value != value:
                equals, raw_value = "=", _requoted(scrubbed_value)
            written.append(raw_key + equals + raw_value)
        return "&".join(written)

    def subprotocols(self, value: str) -> str:
        """A ``Sec-WebSocket-Protocol`` value with every entry masked that is not plainly a
        protocol's name. Browsers cannot send an ``Authorization`` header on a websocket, so
        apps send the token as a subprotocol (``access_token, <token>``, Kubernetes'
        ``base64url.bearer.authorization.k8s.io.<token>``). Kept: entries made of words (a
        run of lower-case, upper-case or title-case letters, digits, or a lower-case word
        with a version number) joined by ``. _ - + /`` (``graphql-transport-ws``,
        ``v12.stomp``, ``ocpp2.0.1``, ``access_token``), except one right after a name that
        looks secret or an auth scheme (the token after ``access_token``, ``Bearer``)."""
        entries = []
        after_secret_name = False
        for entry in value.split(","):
            name = entry.strip(" \t")
            if not name:
                continue
            if after_secret_name or not _is_protocol_name(name):
                entries.append(self.mask(name))
                after_secret_name = False
                continue
            entries.append(name)
            after_secret_name = self.is_secret_key(name) or name.lower() in _AUTH_SCHEMES
        return ", ".join(entries)

    def pairs(self, items: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Scrubbed ``{key: value}`` from pairs such as headers (later duplicates are joined)."""
        joined: dict[str, list[str]] = {}
        for key, value in items:
            scrubbed_key, scrubbed_value = self._field(key, value, urls=True)
            joined.setdefault(scrubbed_key, []).append(scrubbed_value)
        return {key: ", ".join(values) for key, values in joined.items()}

    def _field(self, key: str, value: str, *, urls: bool) -> tuple[str, str]:
        """A header or query parameter scrubbed: its name by value pattern, its value by
        its name and by value (see :meth:`value`)."""
        return self.text(key), self._value(key, value, urls=urls)

    def query(self, query_string: str) -> dict[str, str]:
        """A raw query string, parsed and scrubbed by key and value."""
        parsed = _parse_query(query_string)
        if parsed is None:
            return {"<unparsable>": self.mask(query_string)}
        return self.pairs(parsed)

    def _name_verdict(self, name: str) -> bool | str:
        # Long names (a header name can be kilobytes) are not kept in the cache.
        if len(name) > _MAX_CACHED_KEY_CHARS:
            return self._verdict(name)
        return self._cached_verdict(name)

    def _verdict(self, name: str) -> bool | str:
        """Whether ``name`` is secret, or the short key it starts with when that depends on
        the segment before it, which only free text can supply ("status code")."""
        if self._substrings.search(name.lower()):
            return True
        found = _NAME_SEGMENT.findall(name)
        segments = [segment.lower() for segment in found]
        verdict: bool | str = False
        for index, segment in enumerate(segments):
            short = _SHORT_KEY_OF.get(segment)
            # An upper-case word glued to a short key (SSHPASS) brings its own word before.
            glued = short is None
            if short is None and (short := _glued_short_key(found[index])) is None:
                continue
            after = segments[index + 1] if index + 1 < len(segments) else ""
            if after in HARMLESS_AFTER.get(short, ()) or after in _FILE_EXTENSIONS:
                continue
            if glued:
                return True
            if index == 0 and short in HARMLESS_BEFORE:
                verdict = short
            elif index == 0 or segments[index - 1] not in HARMLESS_BEFORE.get(short, ()):
                return True
        return verdict

    def _escaped_name_verdict(
        self, text: str, name: re.Match[str], verdict: bool | str
    ) -> bool | str:
        """The ``verdict`` on a name after a backslash, with the name read without a leading
        repr escape too when the run of backslashes is odd: "\\npin" is a pin on a new line,
        or as literal text "npin" ("C:\\tokens"). Secret when either reading is."""
        key = name.group("key")
        escape = _REPR_ESCAPE.match(key)
        if escape is None or escape.end() == len(key):
            return verdict
        # Each run of backslashes is counted once: only one name starts right after it.
        start = run = name.start()
        while run > 0 and text[run - 1] == "\\":
            run -= 1
        if (start - run) % 2 == 0:
            return verdict
        unescaped = self._name_verdict(key[escape.end() :])
        return unescaped if unescaped is True or verdict is False else verdict

    def _scrub(self, value: str) -> str:
        if "PRIVATE KEY" in value:
            value = self._mask_private_keys(value)
        if "mysql" in value or "mariadb" in value:
            value = self._mask_glued_passwords(value)
        if "</" in value:
            value = _XML_ELEMENT.sub(self._mask_xml_element, value)
        if "input_value=" in value:
            value = _FIELD_INPUT.sub(self._mask_field_input, value)
        if "Key (" in value:
            value = _ROW_KEY.sub(self._mask_row_key, value)
        value = self._mask_key_values(value)
        value = _URL_CREDENTIALS.sub(lambda m: m.group(1) + self.mask(m.group(2)) + "@", value)
        value = _HOST_CREDENTIALS.sub(lambda m: m.group(1) + self.mask(m.group(2)) + "@", value)
        value = _SCHEME_TOKEN.sub(self._mask_scheme_token, value)
        value = _JWT.sub(lambda m: self.mask(m.group(0)), value)
        value = _KNOWN_KEY.sub(lambda m: self.mask(m.group(0)), value)
        value = _LONG_HEX.sub(lambda m: self.mask(m.group(0)), value)
        return _LONG_TOKEN.sub(self._mask_if_random, value)

    def _mask_key_values(self, text: str) -> str:
        # A loop rather than one pattern with the keys in it: "[\w.-]*(?:keys)[\w.-]*" tried
        # every split of every run and took cubic time. Each name is looked at once here, and
        # after a harmless name the search goes on right after its separator, so its "value"
        # is still searched for names ("user=password=x").
        parts: list[str] = []
        copied = 0
        position = 0
        while (name := self._name.search(text, position)) is not None:
            position = name.end()
            verdict = self._name_verdict(name.group("key"))
            if verdict is not True and text[name.start() - 1 : name.start()] == "\\":
                verdict = self._escaped_name_verdict(text, name, verdict)
            if verdict is False or (
                isinstance(verdict, str)
                and _word_before(text, name.start()) in HARMLESS_BEFORE[verdict]
            ):
                continue
            value = _VALUE.match(text, position)
            if value is None:
                continue
            if value.group("masked") is not None:
                position = value.end()
                continue
            if value.group("open") is None and _HTTP_VERSION.fullmatch(text, position, value.end()):
                continue  # "?code= HTTP/1.1": the request line's version, not the value
            parts.append(text[copied:position])
            opening = value.group("open")
            bracket = None
            if opening is None and value.group("scheme") is None:
                bracket = _OPENING.search(text, position, value.end())
            if bracket is not None:
                # A list, tuple, mapping or call under a secret name ({'password': ['x']}, a
                # parsed form, password=Secret('x')) is masked whole, to its matching bracket.
                end = max(_closing_bracket(text, bracket.start()), value.end())
                parts.append(self.mask(text[position:end]))
            elif opening is None:
                end = value.end()
                parts.append(self.mask(text[position:end]))
            else:
                inner_end, end = _closing_quote(text, value)
                inner = text[value.end() : inner_end]
                if value.group("scheme") is not None:
                    # "Bearer 'xyz'" is masked whole, quotes and all.
                    parts.append(self.mask(text[position:end]))
                elif MASKED.fullmatch(inner):  # scrubbed before: left as it is
                    parts.append(text[position:end])
                else:
                    parts.append(f"{opening}{self.mask(inner)}{text[inner_end:end]}")
            copied = position = end
        parts.append(text[copied:])
        return "".join(parts)

    def _mask_private_keys(self, text: str) -> str:
        parts: list[str] = []
        copied = 0
        while (begin := _PRIVATE_KEY_BEGIN.search(text, copied)) is not None:
            end_line = f"-----END {begin.group('kind')}-----"
            found = text.find(end_line, begin.end())
            end = len(text) if found < 0 else found + len(end_line)
            parts.append(text[copied : begin.start()])
            parts.append(self.mask(text[begin.start() : end]))
            copied = end
        parts.append(text[copied:])
        return "".join(parts)

    def _mask_glued_passwords(self, text: str) -> str:
        parts: list[str] = []
        copied = searched = 0
        for command in _MYSQL_COMMAND.finditer(text):
            if command.start() < searched:  # inside a command already searched
                continue
            start = command.end()
            limit = min(len(text), start + _MAX_COMMAND_CHARS)
            ending = _COMMAND_END.search(text, start, limit)
            searched = ending.start() if ending is not None else limit
            for flag in _GLUED_FLAG.finditer(text, start, searched):
                if flag.start() < copied:
                    continue  # inside a value masked already
                begin = flag.end()
                end = _glued_value_end(text, flag.start(), begin, limit)
                value = text[begin:end]
                if not value or MASKED.fullmatch(value):
                    continue
                parts.append(text[copied:begin])
                parts.append(self.mask(value))
                copied = end
            searched = max(searched, copied)
        parts.append(text[copied:])
        return "".join(parts)

    def _mask_xml_element(self, match: re.Match[str]) -> str:
        value = match.group("value")
        if MASKED.fullmatch(value) or not value.strip() or not self.is_secret_key(match["name"]):
            return match.group(0)
        start = match.start("value") - match.start()
        return f"{match.group(0)[:start]}{self.mask(value)}{match.group(0)[start + len(value) :]}"

    def _mask_field_input(self, match: re.Match[str]) -> str:
        field = match.group("field")
        if MASKED.fullmatch(match.group("value")) or not any(
            self.is_secret_key(part) for part in _FIELD_PARTS.split(field) if part
        ):
            return match.group(0)
        value = match.group("value")
        return match.group(0)[: match.start("value") - match.start()] + self.mask(value)

    def _mask_row_key(self, match: re.Match[str]) -> str:
        columns = match.group("columns").split(",")
        if MASKED.fullmatch(match.group("values")) or not any(
            self.is_secret_key(column.strip().strip('"')) for column in columns
        ):
            return match.group(0)
        return f"Key ({match.group('columns')})=({self.mask(match.group('values'))})"

    def _mask_scheme_token(self, match: re.Match[str]) -> str:
        token = match.group(1)
        # "Basic authentication required" is a sentence, "Basic dXNlcjpw..." a credential
        # (base64 mixes cases inside a word: "Basic dXNlcjpwYXNz" is all letters); a long
        # run of letters ("token correcthorsebatterystaple") is a passphrase. (A mask
        # already there never matches: "[" is not a token character.)
        if (
            token.isalpha()
            and len(token) < 16
            and (token.islower() or token.istitle() or token.isupper())
        ) or _HTTP_VERSION.fullmatch(token):
            # ("POST /oauth/token HTTP/1.1": a request line, not a token's value)
            return match.group(0)
        return match.group(0)[: match.start(1) - match.start(0)] + self.mask(token)

    def _mask_if_random(self, match: re.Match[str]) -> str:
        token = match.group(0)
        return self.mask(token) if looks_random(token) else token

    def has_credential_shape(self, value: str, *, cached: bool = True) -> bool:
        """Whether ``value`` is shaped like a credential rather than an identifier: a JWT, a
        key a service marks with its prefix (``sk_live_...``, ``ghp_...``), a scheme and
        token (``Bearer x``), credentials in a URL, or a ``name=value`` or ``name:value``
        pair under a secret name. A random id (a UUID, a ULID, 32 hex digits) is not: its
        randomness is all a random key has too. How tenant and request ids are screened;
        cached for short values unless ``cached`` is false (values that never repeat)."""
        if not cached or len(value) > _MAX_CACHED_KEY_CHARS:
            return self._credential_shaped(value)
        return self._cached_credential_shaped(value)

    def _credential_shaped(self, value: str) -> bool:
        return (
            bool(
                _KNOWN_KEY.search(value)
                or _JWT.search(value)
                or _SCHEME_TOKEN.search(value)
                or _URL_CREDENTIALS.search(value)
                or _HOST_CREDENTIALS.search(value)
            )
            or self._mask_key_values(value) != value
        )

    def identifier(self, value: str) -> str:
        """``value``, an id screened by :meth:`has_credential_shape` as it came in (a
        tenant's): as it is, unless it has a credential's shape after all, then masked.
        Value patterns alone would mask a random id (a ULID, 32 hex digits) that the
        metrics name as it is."""
        return self.mask(value) if self.has_credential_shape(value) else value

    def looks_secret(self, value: str) -> bool:
        """Whether the value patterns mask any of ``value`` (a token, a ``key=secret``
        pair, a credential in a URL): how tenant ids are screened. Cached for short values."""
        if len(value) > _MAX_CACHED_KEY_CHARS:
            return self.text(value) != value
        return self._cached_looks_secret(value)

    def _looks_secret(self, value: str) -> bool:
        return self.text(value) != value


def _parse_query(query_string: str) -> list[tuple[str, str]] | None:
    """A raw query string's parameters, decoded (blank ones kept), or None when it has more
    than :data:`_MAX_QUERY_FIELDS`."""
    from urllib.parse import parse_qsl

    try:
        return parse_qsl(query_string, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS)
    except ValueError:
        return None


def _requoted(scrubbed: str) -> str:
    """A scrubbed query parameter's name or value written back into a URL: its masks as
    they are, the rest percent-encoded (so a decoded "&" or "#" cannot end it)."""
    from urllib.parse import quote

    parts = []
    copied = 0
    for masked in MASKED.finditer(scrubbed):
        parts.append(quote(scrubbed[copied : masked.start()], safe=_QUERY_SAFE))
        parts.append(masked.group(0))
        copied = masked.end()
    parts.append(quote(scrubbed[copied:], safe=_QUERY_SAFE))
    return "".join(parts)


def is_jwt(value: str) -> bool:
    """Whether ``value`` is, whole, a JWT in compact form: a JWS's three segments or a JWE's
    five, in base64url or base64, padded or not, the first decoding to a JSON object that
    names its ``alg``. A signed one is a bearer credential whatever header brings it (AWS's
    load balancer signs ``X-Amzn-Oidc-Data`` with the user's claims). Costs a count of
    dots for a value with other than two or four."""
    dots = value.count(".")
    if dots != 2 and dots != 4:
        return False
    shape = _JOSE_COMPACT.fullmatch(value)
    if shape is None:
        return False
    header = shape.group(1)
    if len(header) % 4 == 1:
        return False
    try:
        decoded = base64.b64decode(header.translate(_TO_BASE64) + "=" * (-len(header) % 4))
        parsed = json.loads(decoded)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and "alg" in parsed


def _closing_quote(text: str, value: re.Match[str]) -> tuple[int, int]:
    """Where the quoted ``value`` ends: the start and end of its closing quote (the end of
    ``text`` twice when it never closes). The closing quote has exactly as many backslashes
    in front as the opening one; a quote with another run before it is inside the value."""
    return _quote_end(text, value.end(), len(value.group("escape")), value.group("quote"))


def _quote_end(text: str, position: int, escape: int, quote: str) -> tuple[int, int]:
    """The start and end of the first ``quote`` from ``position`` on with exactly ``escape``
    backslashes before it (the end of ``text`` twice when there is none)."""
    pattern = _ESCAPED_QUOTE[quote]
    while (found := pattern.search(text, position)) is not None:
        if len(found.group(1)) == escape:
            return found.start(), found.end()
        position = found.end()
    return len(text), len(text)


def _closing_bracket(text: str, start: int) -> int:
    """The end of the bracketed value that opens at ``start``: just after its matching
    bracket, with brackets inside quoted text (escaped as in reprs, see
    :func:`_closing_quote`) skipped; the end of ``text`` when it never closes or a bracket
    of another kind closes it first (masking too much is the safe side)."""
    expected: list[str] = []
    position = start
    while (found := _STRUCTURE.search(text, position)) is not None:
        position = found.end()
        quote = found.group("quote")
        if quote is not None:
            position = _quote_end(text, position, len(found.group("escape")), quote)[1]
            continue
        bracket = found.group(0)
        if bracket in _CLOSER:
            expected.append(_CLOSER[bracket])
        elif not expected or expected.pop() != bracket:
            return len(text)
        elif not expected:
            return position
    return len(text)


def _word_before(text: str, start: int) -> str:
    """The last segment of the word just before ``start`` across spaces ("status code")."""
    end = start
    while end > 0 and start - end < 4 and text[end - 1] in " \t":
        end -= 1
    if end == start:
        return ""
    begin = end
    while (
        begin > 0 and end - begin < 32 and text[begin - 1].isascii() and text[begin - 1].isalnum()
    ):
        begin -= 1
    segments = _NAME_SEGMENT.findall(text[begin:end])
    return segments[-1].lower() if segments else ""


def _scan_end(value: str, limit: int) -> int:
    """Where the scanned part of ``value`` ends when only ``limit`` characters are scanned
    (see :meth:`Scrubber.text`): after a space near the limit; else at the start of the
    segment before a ``&``, ``,`` or ``;`` near it; else at the start of the token the limit
    falls in. Never further back than :data:`_CUT_WINDOW` characters before the limit: a
    secret whose context a cut took (a URL cut before its ``@``) lies that close to it, and
    a longer run (a blob, a padding) keeps its head readable."""
    window = max(0, limit - _CUT_WINDOW)
    space = max(value.rfind(c, window, limit) for c in _CUT_SPACES)
    if space >= 0:
        return space + 1
    separator = max(value.rfind(c, window, limit) for c in _CUT_SEPARATORS)
    end = separator if separator >= 0 else limit
    return max(max(value.rfind(c, window, end) for c in _CUT_CHARS) + 1, window)


def cut_scrubbed(text: str, max_chars: int, marker: str = "...") -> str:
    """``text``, already scrubbed, cut to ``max_chars`` (then ``marker``): a cut after
    scrubbing shows nothing it had masked. A mask the cut falls in is left out whole."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    opened = head.rfind("[scrubbed len=")
    if opened >= 0 and "]" not in head[opened:]:
        head = head[:opened]
    return head + marker


def _glued_short_key(segment: str) -> str | None:
    """The short key an upper-case word ends in when it glues one to a word before it
    (``SSHPASS``: ``pass``), None for any other segment or a harmless word (``COMPASS``)."""
    if len(segment) < 4 or not segment.isupper():
        return None
    glued = _GLUED_NAME.fullmatch(segment)
    if glued is None:
        return None
    short = glued.group(2).lower()
    before = glued.group(1).lower()
    if before in HARMLESS_GLUED[short] or before in HARMLESS_BEFORE.get(short, ()):
        return None
    return short


def _is_protocol_name(name: str) -> bool:
    """Whether a websocket subprotocol entry is made of words (see
    :meth:`Scrubber.subprotocols`)."""
    if len(name) > _MAX_PROTOCOL_CHARS:
        return False
    for segment in _PROTOCOL_SEPARATORS.split(name):
        if not segment:
            continue
        if not (
            segment.isdigit()
            or (
                segment.isalpha()
                and segment.isascii()
                and (segment.islower() or segment.isupper() or segment.istitle())
            )
            or (segment.isascii() and _is_word_with_version(segment))
        ):
            return False
    return True


def looks_random(token: str) -> bool:
    """Whether ``token`` looks like generated key material rather than words or a path.

    Identifiers and paths are mostly whole words (``migrations/0042_add_user_index``);
    key material is a mix of cases and digits with few word-like segments and high entropy.
    """
    if len(token) == 36 and _UUID.fullmatch(token) is not None:
        return False
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
