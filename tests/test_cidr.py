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
