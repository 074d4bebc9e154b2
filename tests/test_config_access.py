"""
Tests for L{rproxy.config.access}: C{trusted_proxies}, C{auth},
C{redirect}, C{strip_prefix} and C{add_prefix}, and users files.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from rproxy.config import ConfigError, parse_config
from rproxy.config.access import AuthConfig, BasicAuthConfig, Policy, RedirectConfig, parse_users

# made with bcrypt.hashpw(b"secret", gensalt(4)) ($2b$ written as htpasswd -B's $2y$)
# and argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("hunter2")
BCRYPT_SECRET = "$2y$04$xLKNQiNbiMzHKDc3fB72RewNyIfFaPS7/cTahgZaoNY/ru.jJ.fjW"
ARGON2_HUNTER2 = "$argon2id$v=19$m=8,t=1,p=1$xnltlbNW/IOO5IHgB1WeIw$SehHnT5uByLJwIDO2PvTEfEL0RY/lbGx2cWbB+O0vNM"


def document(frontend: dict[str, Any] | None = None, route: dict[str, Any] | None = None) -> dict[str, Any]:
    fe: dict[str, Any] = {"name": "web", "listen": "tcp:8080", "backend": "web", "protocol": "http"}
    fe.update(frontend or {})
    if route is not None:
        fe["routes"] = [{"path_prefix": "/api", "backend": "web", **route}]
    return {
        "backends": [{"name": "web", "servers": ["127.0.0.1:9001"]}],
        "frontends": [fe],
    }


class ConfigAccessTests(SynchronousTestCase):
    def errors(self, data: object) -> list[str]:
        return self.assertRaises(ConfigError, parse_config, data).errors

    def users_file(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_no_policy(self) -> None:
        """
        A frontend and a route without any policy key have None.
        """
        config = parse_config(document(route={}))
        self.assertIsNone(config.frontends[0].policy)
        self.assertIsNone(config.frontends[0].routes[0].policy)

    def test_frontend_policy(self) -> None:
        """
        trusted_proxies, auth and redirect on a frontend are read into its
        Policy; the users file's lines become (user, hash) pairs.
        """
        path = self.users_file(f"# users\nalice:{BCRYPT_SECRET}\n\nbob:{ARGON2_HUNTER2}\n")
        config = parse_config(document({
            "trusted_proxies": ["10.0.0.0/8", "::1"],
            "auth": {"api_keys": True, "basic": {"users_file": path, "realm": "ops area", "cache_ttl": "30s"}},
            "redirect": {"scheme": "https", "status": 308, "port": 8443},
        }))
        self.assertEqual(config.frontends[0].policy, Policy(
            auth=AuthConfig(api_keys=True, basic=BasicAuthConfig(
                path=path, users=(("alice", BCRYPT_SECRET), ("bob", ARGON2_HUNTER2)), realm="ops area",
                cache_ttl=30.0)),
            redirect=RedirectConfig(status=308, scheme="https", port=8443),
            trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")),
        ))

    def test_empty_trusted_proxies(self) -> None:
        """
        trusted_proxies: [] trusts nobody (every X-Forwarded-For replaced),
        which is not the same as no key at all.
        """
        config = parse_config(document({"trusted_proxies": []}))
        self.assertEqual(config.frontends[0].policy.trusted_proxies, ())

    def test_route_policy(self) -> None:
        """
        A route's auth, redirect and prefixes; a trailing slash of a
        prefix is dropped.
        """
        config = parse_config(document(route={
            "auth": {"api_keys": True}, "redirect": {"location": "https://new.example{target}", "status": 301},
            "strip_prefix": "/api/", "add_prefix": "/v1",
        }))
        self.assertEqual(config.frontends[0].routes[0].policy, Policy(
            auth=AuthConfig(api_keys=True),
            redirect=RedirectConfig(status=301, location="https://new.example{target}"),
            strip_prefix="/api", add_prefix="/v1",
        ))

    def test_route_turns_off(self) -> None:
        """
        auth: false and redirect: false on a route mean none there.
        """
        policy = parse_config(document(route={"auth": False, "redirect": False})).frontends[0].routes[0].policy
        self.assertEqual((policy.auth, policy.redirect), (AuthConfig(), RedirectConfig()))
        self.assertFalse(policy.auth.required)

    def test_errors(self) -> None:
        """
        Every wrong value is reported with its key path.
        """
        self.assertEqual(self.errors(document({
            "trusted_proxies": ["10.0.0.1/8", 7],
            "auth": {"api_keys": "yes", "bassic": {}},
            "redirect": {"scheme": "ftp", "status": 200},
        })), [
            "frontends[0].auth.api_keys: expected true or false, got a string 'yes'",
            "frontends[0].auth.bassic: unknown key (did you mean 'basic'?)",
            "frontends[0].auth: names no method: set api_keys: true, basic: {users_file: PATH}, or both",
            "frontends[0].redirect.status: 200 is not one of 301, 302, 303, 307, 308",
            "frontends[0].redirect.scheme: 'ftp' is not one of http, https",
            "frontends[0].trusted_proxies[0]: 10.0.0.1/8 has host bits set",
            "frontends[0].trusted_proxies[1]: 7 is not a network",
        ])

    def test_frontend_cannot_turn_off(self) -> None:
        """
        auth: false and redirect: false are for routes; a frontend without
        them just leaves the key out.
        """
        self.assertEqual(self.errors(document({"auth": False, "redirect": False})), [
            "frontends[0].auth: expected a mapping such as {api_keys: true} or {basic: {users_file: PATH}}, "
            "got a boolean False",
            "frontends[0].redirect: expected a mapping such as {scheme: https, status: 308}, got a boolean False",
        ])

    def test_redirect_errors(self) -> None:
        """
        A redirect needs a scheme or a location, not both; a location is an
        absolute http(s) URL with known placeholders; a port goes with a
        scheme.
        """
        self.assertEqual(self.errors(document(route={"redirect": {"status": 301}})),
                         ["frontends[0].routes[0].redirect: needs scheme (http or https) or location (a URL)"])
        self.assertEqual(self.errors(document(route={"redirect": {"scheme": "https", "location": "https://x"}})),
                         ["frontends[0].routes[0].redirect.location: give scheme or location, not both"])
        self.assertEqual(self.errors(document(route={"redirect": {"location": "/relative"}})),
                         ["frontends[0].routes[0].redirect.location: '/relative' is not an absolute http:// "
                          "or https:// URL"])
        self.assertEqual(self.errors(document(route={"redirect": {"location": "https://x/{path}"}})),
                         ["frontends[0].routes[0].redirect.location: 'https://x/{path}': the only placeholders "
                          "are {host} and {target}"])
        self.assertEqual(self.errors(document(route={"redirect": {"location": "https://x", "port": 1}})),
                         ["frontends[0].routes[0].redirect.port: goes with scheme (a location URL holds its "
                          "own port)"])

    def test_prefix_errors(self) -> None:
        """
        Prefixes are plain absolute paths other than /.
        """
        self.assertEqual(self.errors(document(route={"strip_prefix": "api", "add_prefix": "/"})), [
            "frontends[0].routes[0].strip_prefix: 'api' must start with / and hold no spaces or control characters",
            "frontends[0].routes[0].add_prefix: '/' changes nothing: give a prefix such as /api",
        ])
        self.assertEqual(self.errors(document(route={"strip_prefix": "/a?b"})), [
            "frontends[0].routes[0].strip_prefix: '/a?b' must be a plain path: no '?', '#', '%' or "
            "non-ASCII characters",
        ])

    def test_tcp_frontend(self) -> None:
        """
        The HTTP policy keys on a TCP frontend are errors.
        """
        data = document({"protocol": "tcp", "auth": {"api_keys": True}, "trusted_proxies": []})
        self.assertEqual(self.errors(data), [
            "frontends[0].trusted_proxies: needs protocol: http",
            "frontends[0].auth: needs protocol: http",
        ])

    def test_users_file_errors(self) -> None:
        """
        A users file's bad lines are named by number, without their hash;
        a missing file is named.
        """
        path = self.users_file(
            f"alice:{BCRYPT_SECRET}\nnocolon\nbob:$apr1$abc$def\ncarol:plain\n"
            f"dave:$2y$04$short\nalice:{ARGON2_HUNTER2}\nerin:$secretsecretsecret$x\n"
        )
        self.assertEqual(self.errors(document({"auth": {"basic": {"users_file": path}}})), [
            f"frontends[0].auth.basic.users_file: {path} line 2: expected user:hash",
            f"frontends[0].auth.basic.users_file: {path} line 3: user 'bob': unsupported hash ($apr1$); "
            "use bcrypt (htpasswd -B) or argon2id",
            f"frontends[0].auth.basic.users_file: {path} line 4: user 'carol': unsupported hash (plain text or crypt); "
            "use bcrypt (htpasswd -B) or argon2id",
            f"frontends[0].auth.basic.users_file: {path} line 5: user 'dave': malformed bcrypt hash",
            f"frontends[0].auth.basic.users_file: {path} line 6: user 'alice' is listed twice",
            f"frontends[0].auth.basic.users_file: {path} line 7: user 'erin': unsupported hash (an unknown $ "
            "scheme); use bcrypt (htpasswd -B) or argon2id",
        ])
        missing = "no-such-users-file"
        self.assertEqual(self.errors(document(route={"auth": {"basic": {"users_file": missing}}})), [
            f"frontends[0].routes[0].auth.basic.users_file: cannot read '{missing}': No such file or directory",
        ])
        empty = self.users_file("# nobody yet\n")
        self.assertEqual(self.errors(document({"auth": {"basic": {"users_file": empty}}})), [
            f"frontends[0].auth.basic.users_file: {empty} holds no user:hash line",
        ])

    def test_realm(self) -> None:
        """
        A realm that cannot go into a quoted string is refused.
        """
        path = self.users_file(f"alice:{BCRYPT_SECRET}\n")
        self.assertEqual(self.errors(document({"auth": {"basic": {"users_file": path, "realm": 'a"b'}}})), [
            "frontends[0].auth.basic.realm: 'a\"b' must be up to 100 printable ASCII characters, "
            "without '\"' or '\\'",
        ])

    def test_parse_users(self) -> None:
        """
        Comments and blank lines are skipped; argon2i/d and bcrypt
        variants are accepted.
        """
        users, problems = parse_users("f", f"  # c\n\nu1:{BCRYPT_SECRET.replace('$2y$', '$2b$')}\r\n".encode())
        self.assertEqual((len(users), problems), (1, []))
        self.assertEqual(parse_users("f", b"\xff:x"), ((), ["f is not UTF-8 text"]))

    def test_direct_routes_and_route_policies(self) -> None:
        """
        direct_routes with a route guarded by allow/deny or auth is
        refused (a direct route would go around them); with policies on
        the frontend only, or on no route, it is read.
        """
        data = document({"http": {"direct_routes": True}, "routes": [
            {"path_prefix": "/public", "backend": "web"},
            {"path_prefix": "/admin", "backend": "web", "deny": ["10.0.0.0/8"], "auth": {"api_keys": True}},
        ]})
        self.assertEqual(self.errors(data), [
            "frontends[0].http.direct_routes: /backend/NAME/... would reach the servers of backend 'web' without "
            "the deny and auth of frontends[0].routes[1]; put that policy on the frontend (it applies to direct "
            "routes too) or turn direct_routes off"])
        config = parse_config(document({"http": {"direct_routes": True}, "allow": ["10.0.0.0/8"],
                                        "auth": {"api_keys": True}, "routes": [
                                            {"path_prefix": "/health", "backend": "web", "auth": False}]}))
        self.assertTrue(config.frontends[0].http.direct_routes)
