"""bench/s3_rig.py's pure parts: the tc script that caps each connection, the class a port falls in, sizes.
The live rig (namespace, veth, s3rver) needs root and npm: GRAFT_TEST_S3_RIG=1 runs that part."""

from __future__ import annotations

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import s3_rig  # noqa: E402


def _leaf_filters(script: str) -> dict[tuple[int, int], int]:
    """(table, bucket) -> HTB class minor, from the script's `ht T:B: ... flowid 1:C` lines."""
    found = {}
    for t, b, c in re.findall(r"ht ([0-9a-f]+):([0-9a-f]+): match u32 0 0 flowid 1:([0-9a-f]+)", script):
        found[(int(t, 16), int(b, 16))] = int(c, 16)
    return found


def _class_of(port: int, script: str, class_bits: int) -> int:
    """The class the script's u32 tables give a port, followed as the kernel does: key & mask, shifted down by the
    mask's lowest set bit, is the bucket of the next table."""
    top = re.search(r"ht 800:: .*hashkey mask (0x[0-9a-f]+) at 20 link 2:", script)
    assert top is not None
    word = {0x00FF0000: port << 16, 0x000000FF: port}[int(top.group(1), 16)]  # src: high half, dst: low half

    def bucket(mask: int) -> int:
        return (word & mask) >> ((mask & -mask).bit_length() - 1)

    leaves = _leaf_filters(script)
    b = bucket(int(top.group(1), 16))
    if class_bits == 8:
        return leaves[(2, b)]
    link = re.search(rf"ht 2:{b:x}: match u32 0 0 hashkey mask (0x[0-9a-f]+) at 20 link ([0-9a-f]+):", script)
    assert link is not None
    return leaves[(int(link.group(2), 16), bucket(int(link.group(1), 16)))]


@pytest.mark.parametrize("side", ["src", "dst"])
@pytest.mark.parametrize("class_bits", [8, 10])
def test_each_port_value_gets_its_own_class(side, class_bits):
    script = s3_rig.tc_script("d", 5e6, client_port_is=side, class_bits=class_bits)
    classes = {_class_of(port, script, class_bits) for port in range(40000, 40000 + (1 << class_bits))}
    assert len(classes) == 1 << class_bits  # consecutive ports: all distinct
    assert _class_of(40000, script, class_bits) == _class_of(40000 + (1 << class_bits), script, class_bits)
    # every class the filters name exists, capped at the rate (40 Mbit = 5 MB/s), under the link's class
    rates = dict(re.findall(r"parent 1:fffe classid 1:([0-9a-f]+) htb rate \S+ ceil (\S+)", script))
    assert {int(c, 16) for c in rates} == classes and set(rates.values()) == {"40000000bit"}


def test_link_cap_shares_and_replace_changes_rates_only():
    script = s3_rig.tc_script("d", 5e6, client_port_is="src", class_bits=8, link_rate=20e6)
    assert "classid 1:fffe htb rate 160000000bit ceil 160000000bit" in script
    # each connection guaranteed its share of the link, borrowing up to its own cap
    assert f"classid 1:1 htb rate {int(20e6 / 256 * 8)}bit ceil 40000000bit" in script
    change = s3_rig.tc_script("d", None, client_port_is="src", class_bits=8, replace=True)
    assert "filter" not in change and "qdisc" not in change
    assert change.count("class change") == 257 and "ceil 100gbit" in change


def test_port_collisions_and_sizes():
    assert s3_rig.port_collisions([1000, 1002, 1000 + 256], class_bits=8) == 2
    assert s3_rig.port_collisions([1000, 1002, 1000 + 256], class_bits=10) == 0
    assert s3_rig.parse_size("360MB") == 360_000_000 and s3_rig.parse_size("16MiB") == 16 << 20
    assert s3_rig.parse_size("123") == 123


@pytest.mark.skipif(os.environ.get("GRAFT_TEST_S3_RIG") != "1", reason="live rig: GRAFT_TEST_S3_RIG=1 (root, npm)")
def test_live_rig_caps_each_connection_and_cleans_up():
    with s3_rig.S3Rig(class_bits=10) as rig:
        rig.start(5e6)
        rig.create_bucket("rig")
        size = 10_000_000
        with rig.uncapped():
            rig.client().put_object(Bucket="rig", Key="blob", Body=os.urandom(size))
        obj = [("rig", "blob", size)]
        floor = rig.read_floor([obj, obj, obj], 1, window=size)
        ns = rig.ns
    # three connections at once, each ~2 s at 5 MB/s (minus headers): together, not one after another
    assert 1.8 < floor.seconds < 4.0
    assert ns not in s3_rig.run(["ip", "netns", "list"]).stdout
