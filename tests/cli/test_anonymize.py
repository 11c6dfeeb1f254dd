"""gather-logs --anonymize: stand-ins that are the same for the same original in every file,
that leave what identifies nobody (loopback, well-known namespaces, times), and that never
match inside a longer name."""

from __future__ import annotations

from tele.cli.anonymize import Anonymizer


def test_names_and_addresses_get_consistent_stand_ins() -> None:
    anonymize = Anonymizer(
        [("namespace", "shop"), ("pod", "cart-5d8f7-x2x"), ("workload", "cart"),
         ("namespace", "default"), ("user", "alice")]
    )  # fmt: skip
    first = anonymize(
        "2026-12-06 15:30:02.701 alice engaged shop/cart (pod cart-5d8f7-x2x at 10.244.1.7:8080, "
        "fd00:10:244::7 via [fd00:10:244::7]:80) in default; cartography 10.244.1.8/16 127.0.0.1"
    )
    assert first == (
        "2026-12-06 15:30:02.701 user-1 engaged namespace-1/workload-1 (pod pod-1 at "
        "192.0.2.1:8080, 2001:db8::1 via [2001:db8::1]:80) in default; cartography "
        "192.0.2.2/16 127.0.0.1"
    )
    # another file: the same originals, the same stand-ins
    assert anonymize("10.244.1.8 then 10.244.1.7; cart in shop") == (
        "192.0.2.2 then 192.0.2.1; workload-1 in namespace-1"
    )


def test_what_is_not_an_address_is_left_alone() -> None:
    anonymize = Anonymizer([])
    text = "at 15:30:02 version 1.27.3 mac 02:42:ac:11:00:02 ::1 0.0.0.0 999.1.1.1 ff02::1"
    assert anonymize(text) == text
