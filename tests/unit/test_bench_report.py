"""bench/harness/report.py: what the figure's colours are, panel by panel."""

from __future__ import annotations

from bench.harness.report import series_colours

PALETTE = ["c0", "c1", "c2"]


def test_a_device_keeps_its_colour_across_panels() -> None:
    disk = ["ide", "virtio", "qsd", "ours"]
    net = ["e1000", "virtio-net", "ours"]  # "ours" third here, fourth on the disk panel
    pkt = ["dpdk", "ours"]
    colour = series_colours([disk, net, pkt], [*PALETTE, "c3", "c4", "c5", "c6"])
    assert colour["ours"] == "c3"
    assert len(set(colour.values())) == len(colour)  # no two devices share one


def test_more_devices_than_colours_wrap() -> None:
    colour = series_colours([["a", "b", "c", "d"]], PALETTE)
    assert [colour[n] for n in "abcd"] == ["c0", "c1", "c2", "c0"]
