"""
CIDR matching (L{rproxy.cidr}).
"""

from twisted.trial.unittest import SynchronousTestCase

from rproxy.cidr import CIDRSet, parse_network


class CIDRSetTests(SynchronousTestCase):
    def test_networks_and_hosts(self) -> None:
        cidrs = CIDRSet(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
        self.assertIn("10.200.3.4", cidrs)
        self.assertIn("192.0.2.7", cidrs)
        self.assertNotIn("192.0.2.8", cidrs)
        self.assertNotIn("11.0.0.1", cidrs)
        self.assertIn("2001:db8::1", cidrs)
        self.assertNotIn("2001:db9::1", cidrs)

    def test_mapped_ipv4(self) -> None:
        """An IPv4-mapped IPv6 address matches the IPv4 networks."""
        self.assertIn("::ffff:10.1.2.3", CIDRSet(["10.0.0.0/8"]))

    def test_not_an_address(self) -> None:
        """A path or garbage matches nothing (and does not raise)."""
        cidrs = CIDRSet(["0.0.0.0/0", "::/0"])
        self.assertNotIn("/run/rproxy.sock", cidrs)
        self.assertIn("127.0.0.1", cidrs)

    def test_cached_answers_stay_right(self) -> None:
        cidrs = CIDRSet(["127.0.0.0/8"])
        for _ in range(3):
            self.assertIn("127.0.0.1", cidrs)
            self.assertNotIn("10.0.0.1", cidrs)

    def test_empty_is_false(self) -> None:
        self.assertFalse(CIDRSet())
        self.assertTrue(CIDRSet(["::1"]))

    def test_host_bits_are_an_error(self) -> None:
        self.assertRaises(ValueError, parse_network, "10.0.0.1/8")
        self.assertRaises(ValueError, parse_network, "not-a-net")


class AccessListTests(SynchronousTestCase):
    def test_deny_wins(self) -> None:
        from rproxy.cidr import AccessList

        acl = AccessList(CIDRSet(["10.0.0.0/8"]), CIDRSet(["10.9.0.0/16"]))
        self.assertTrue(acl.permits("10.1.2.3"))
        self.assertFalse(acl.permits("10.9.2.3"))
        self.assertFalse(acl.permits("192.0.2.1"))

    def test_deny_only(self) -> None:
        from rproxy.cidr import AccessList

        acl = AccessList(CIDRSet(), CIDRSet(["192.0.2.0/24"]))
        self.assertTrue(acl.permits("10.1.2.3"))
        self.assertFalse(acl.permits("192.0.2.200"))


class ConfigTests(SynchronousTestCase):
    def frontend(self, **extra: object) -> dict[str, object]:
        return {"name": "fe", "protocol": "http", "listen": "127.0.0.1:0", "backend": "be", **extra}

    def load(self, frontend: dict[str, object]) -> object:
        from rproxy.config import config_from_mapping

        return config_from_mapping({
            "admin": {"listen": None},
            "backends": [{"name": "be", "servers": [{"address": "127.0.0.1:1"}]}],
            "frontends": [frontend],
        })

    def test_frontend_and_route_lists(self) -> None:
        config = self.load(self.frontend(
            allow=["10.0.0.0/8", "::1"], deny=["10.9.0.0/16"],
            routes=[{"path_prefix": "/admin", "backend": "be", "allow": ["127.0.0.1"]}]))
        fe = config.frontends[0]
        self.assertTrue(fe.access.permits("::1"))
        self.assertFalse(fe.access.permits("10.9.0.1"))
        self.assertFalse(fe.routes[0].access.permits("10.0.0.1"))
        self.assertIsNone(self.load(self.frontend()).frontends[0].access)

    def test_errors_name_the_key_path(self) -> None:
        from rproxy.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            self.load(self.frontend(allow=["10.0.0.1/8", 7], deny="10.0.0.0/8"))
        message = str(caught.exception)
        self.assertIn("frontends[0].allow[0]", message)
        self.assertIn("frontends[0].allow[1]", message)
        self.assertIn("frontends[0].deny: expected a list", message)
