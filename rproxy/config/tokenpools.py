"""
The reader of C{token_pools}: where to log in upstream, with which
credentials, and how long the tokens live.
"""

from __future__ import annotations

from rproxy.config import values as v
from rproxy.config.model import Credential, TokenPoolConfig
from rproxy.config.reader import MISSING, Section
from rproxy.config.sections import header_pairs, read_upstream_tls
from rproxy.config.values import brief, parse_hostport

__all__ = ["read_token_pool", "parse_credentials"]


def parse_credentials(path: str, content: bytes) -> tuple[list[Credential], list[str]]:
    """
    C{username:password} per line; blank lines and C{#} comments skipped.
    """
    credentials, problems = [], []
    try:
        lines = content.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        return [], [f"cannot read {brief(path)}: {e}"]
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, password = line.partition(":")
        if not sep or not username:
            problems.append(f"{path} line {number}: expected username:password")
            continue
        credentials.append(Credential(username=username, password=password))
    return credentials, problems


def read_token_pool(parent: Section, path: str, raw: object) -> TokenPoolConfig | None:
    section = parent.child(raw, path)
    errors = section.errors
    if not section.ok:
        return None
    d = TokenPoolConfig(name="", host="", port=0, credentials=())
    name = section.value("name", v.name)
    upstream = section.section("upstream")
    address = upstream.value("address", v.text)
    host, port = "", 0
    if address:
        try:
            host, port = parse_hostport(address)
        except ValueError as e:
            upstream.error("address", str(e))
    tls = read_upstream_tls(upstream)
    upstream.finish()

    login = section.section("login")
    login_path = login.value("path", v.url_path, d.login_path)
    body = d.login_body
    raw_body = login.raw("body")
    if raw_body is not MISSING and raw_body is not None:
        if not isinstance(raw_body, dict) or not raw_body:
            login.error("body", f"expected a mapping of JSON fields, got {v.kind(raw_body)}")
        else:
            pairs = []
            for key, value in raw_body.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    login.errors.append(f"{login.key_path('body')}: field {brief(key)} needs a string value")
                    continue
                pairs.append((key, value))
            body = tuple(pairs)
    headers = header_pairs(login.section("headers"))
    token_field = login.value("token", v.field_path, d.token_field)
    ok_field = login.value("ok_field", v.field_path, d.ok_field) if login.raw("ok_field") is not None else None
    ok_value = login.value("ok_value", lambda x: v.text(x) if not isinstance(x, int) else str(x), d.ok_value)
    expires_field = login.value("expires_in", v.field_path, None)
    login.finish()

    credentials = []
    for item_path, item in section.items("credentials"):
        cred = section.child(item, item_path)
        username = cred.value("username", v.text)
        password = cred.value("password", lambda x: str(x) if isinstance(x, (str, int)) else v.text(x))
        cred.finish()
        if username and password is not None:
            credentials.append(Credential(username=username, password=password))
    cred_file = section.value("credentials_file", v.text, None)
    if cred_file is not None:
        try:
            more, problems = parse_credentials(cred_file, section.sources.file(cred_file))
        except OSError as e:
            more, problems = [], [f"cannot read {brief(cred_file)}: {e.args[0] if e.args else e}"]
        credentials += more
        for problem in problems:
            section.error("credentials_file", problem)
    seen = set()
    for credential in credentials:
        if credential.username in seen:
            section.error("credentials", f"username {brief(credential.username)} is listed twice")
        seen.add(credential.username)

    retry = section.section("retry")
    retry_initial = retry.value("initial", v.positive_duration, d.retry_initial)
    retry_max = retry.value("max", v.positive_duration, d.retry_max)
    retry.finish()
    ttl = section.value("ttl", v.positive_duration, d.ttl)
    refresh_before = section.value("refresh_before", v.duration, d.refresh_before)
    config = TokenPoolConfig(
        name=name or "",
        host=host,
        port=port,
        credentials=tuple(credentials),
        tls=tls,
        login_path=login_path,
        login_body=body,
        login_headers=headers,
        token_field=token_field,
        ok_field=ok_field,
        ok_value=ok_value,
        expires_field=expires_field,
        sessions_per_credential=section.value("sessions_per_credential", v.int_in(1, 1000), 1),
        ttl=ttl,
        refresh_before=refresh_before,
        queue_timeout=section.value("queue_timeout", v.duration, d.queue_timeout),
        max_waiters=section.value("max_waiters", v.int_in(0, 1_000_000), d.max_waiters),
        login_timeout=section.value("login_timeout", v.positive_duration, d.login_timeout),
        login_concurrency=section.value("login_concurrency", v.int_in(1, 1000), d.login_concurrency),
        max_login_failures=section.value("max_login_failures", v.int_in(1, 1000), d.max_login_failures),
        retry_initial=retry_initial,
        retry_max=retry_max,
    )
    if refresh_before >= ttl:
        section.error("refresh_before", f"must be less than ttl ({ttl:g}s)")
    if retry_initial > retry_max:
        retry.error("initial", f"is more than retry.max ({retry_max:g}s)")
    if not credentials and not section.has("credentials_file") and name:
        section.error("credentials", "required (or credentials_file): at least one username and password")
    elif not credentials and cred_file is not None and not any(e.startswith(f"{path}.credentials_file") for e in errors):
        section.error("credentials_file", f"{cred_file} holds no username:password line")
    section.finish()
    # an invalid pool still has its name, so that frontends naming it get
    # no second error
    return config if name else None
