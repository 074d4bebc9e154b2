"""
Validation of the backends table's rows as the admin API receives them
(pure: no database).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rproxy.store.backends import BackendError, validate


class ValidateTests(SynchronousTestCase):
    """
    L{validate} takes ids of 1-128 letters, digits or C{._:@-} and nothing else.
    """

    def test_ids(self) -> None:
        """Good ids pass; a trailing newline (which C{$} would let through) or any other character is refused."""
        row = validate({"server_id": "gpu-1.a:b@c", "pool": "live", "address": "127.0.0.1:1"})
        self.assertEqual((row["server_id"], row["pool"]), ("gpu-1.a:b@c", "live"))
        for bad in ("abc\n", "abc\r", "a b", "", "-a", "a" * 129, "a\x00"):
            with self.assertRaises(BackendError) as caught:
                validate({"server_id": bad, "pool": "live", "address": "127.0.0.1:1"})
            self.assertEqual(str(caught.exception), "server_id: expected 1-128 letters, digits or ._:@-")
            with self.assertRaises(BackendError):
                validate({"server_id": "ok", "pool": bad, "address": "127.0.0.1:1"})
