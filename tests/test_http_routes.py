"""
Tests for L{rproxy.http.routes}: first match wins, by host and path prefix.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rproxy.http.routes import Route, RouteTable, direct_target, normalize_host


class RouteTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = RouteTable((
            Route(backend="api", host="api.example.com", path_prefix="/v1/"),
            Route(backend="wild", host="*.example.com"),
            Route(backend="static", path_prefix="/static/", set_headers=(("X-Tag", "s"),),
                  remove_headers=("Cookie",)),
        ), "default")

    def backend(self, host: bytes | None, target: bytes) -> str | None:
        rule = self.table.match(host, target)
        return rule.backend if rule is not None else None

    def test_first_match_wins(self) -> None:
        self.assertEqual(self.backend(b"api.example.com", b"/v1/x"), "api")
        # same host, other path: the wildcard is next
        self.assertEqual(self.backend(b"api.example.com", b"/v2/x"), "wild")
        self.assertEqual(self.backend(b"www.example.com", b"/static/a.css"), "wild")
        self.assertEqual(self.backend(b"other.org", b"/static/a.css"), "static")
        self.assertEqual(self.backend(b"other.org", b"/"), "default")

    def test_host_normalized(self) -> None:
        """
        Host matches without case and port; the query is not part of the path.
        """
        self.assertEqual(self.backend(b"API.Example.COM:8443", b"/v1/?q=1"), "api")
        self.assertEqual(self.backend(b"api.example.com", b"/v1?x=/v1/"), "wild")
        self.assertEqual(normalize_host(b"[::1]:80"), b"[::1]")
        self.assertEqual(normalize_host(None), b"")

    def test_wildcard_needs_a_label(self) -> None:
        """
        C{*.example.com} matches subdomains, not example.com itself, nor
        a host that merely ends with the same letters.
        """
        self.assertEqual(self.backend(b"example.com", b"/"), "default")
        self.assertEqual(self.backend(b"badexample.com", b"/"), "default")
        self.assertEqual(self.backend(b"a.b.example.com", b"/"), "wild")

    def test_rules_as_bytes(self) -> None:
        """
        A route's header rules are bytes; a field it sets is also removed.
        """
        rule = self.table.match(b"x", b"/static/")
        assert rule is not None
        self.assertEqual(rule.set_headers, ((b"X-Tag", b"s"),))
        self.assertEqual(rule.remove, frozenset({b"cookie", b"x-tag"}))

    def test_no_default(self) -> None:
        table = RouteTable((Route(backend="a", host="a"),), None)
        self.assertIsNone(table.match(b"b", b"/"))
        self.assertIsNone(RouteTable((), None).match(b"b", b"/"))

    def test_direct_target(self) -> None:
        self.assertEqual(direct_target(b"/backend/s1/v1/models?x=1"), ("s1", b"/v1/models?x=1"))
        self.assertEqual(direct_target(b"/backend/s1"), ("s1", b"/"))
        self.assertEqual(direct_target(b"/backend/s1?x=1"), ("s1", b"/?x=1"))
        self.assertIsNone(direct_target(b"/backend//x"))
        self.assertIsNone(direct_target(b"/other/s1/x"))
