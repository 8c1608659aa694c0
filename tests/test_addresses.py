"""
Tests for L{a3s_gateway.addresses}.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from a3s_gateway.addresses import Networks, parse_address, parse_network


class AddressTests(SynchronousTestCase):
    def test_parse_address(self) -> None:
        """
        IPv4 and IPv6 addresses parse; an IPv4-mapped one becomes IPv4; anything else is None.
        """
        self.assertEqual(parse_address("10.0.0.1"), ipaddress.IPv4Address("10.0.0.1"))
        self.assertEqual(parse_address("::ffff:10.0.0.1"), ipaddress.IPv4Address("10.0.0.1"))
        self.assertEqual(parse_address("::1"), ipaddress.IPv6Address("::1"))
        self.assertIsNone(parse_address("unix:/tmp/socket"))

    def test_parse_network(self) -> None:
        """
        A bare IP is a one-address network, host bits are allowed, a mapped network is IPv4,
        and garbage raises ValueError.
        """
        self.assertEqual(parse_network("10.0.0.1"), ipaddress.IPv4Network("10.0.0.1/32"))
        self.assertEqual(parse_network("10.1.2.3/8"), ipaddress.IPv4Network("10.0.0.0/8"))
        self.assertEqual(parse_network("::ffff:10.0.0.0/104"), ipaddress.IPv4Network("10.0.0.0/8"))
        self.assertEqual(parse_network("2001:db8::/32"), ipaddress.IPv6Network("2001:db8::/32"))
        self.assertRaises(ValueError, parse_network, "10.0.0.0/33")

    def test_contains(self) -> None:
        """
        An address is inside when a network of its own family holds it; None never is; an
        empty list is false.
        """
        networks = Networks.parse(["10.0.0.0/8", "::ffff:192.168.0.0/112", "2001:db8::/32"])
        self.assertTrue(networks)
        self.assertFalse(Networks())
        self.assertTrue(networks.contains(parse_address("10.9.8.7")))
        self.assertTrue(networks.contains(parse_address("::ffff:10.0.0.1")))
        self.assertTrue(networks.contains(parse_address("192.168.3.4")))
        self.assertTrue(networks.contains(parse_address("2001:db8::5")))
        self.assertFalse(networks.contains(parse_address("11.0.0.1")))
        self.assertFalse(networks.contains(parse_address("::1")))
        self.assertFalse(networks.contains(None))
