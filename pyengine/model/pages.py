"""The packed weights on huge pages.

A decoder step streams every packed weight once: at batch 1 that is ~50 MB (int8) or ~100 MB (bf16) a step, mostly
from L3. On 4 KiB pages that is 12-25 thousand pages a step, far more than the TLB holds, and each miss walks the
page tables (in a VM, two sets of them). Copied into one anonymous mapping advised MADV_HUGEPAGE, the weights sit
on 2 MiB pages wherever the kernel grants them (transparent huge pages "always" or "madvise"): ~50-100 pages a
step. Measured paired in one process (docs/performance.md): on the Intel Xeon batch 1 greedy 2-6% faster, beam 4
~3% (int8, bf16); on the AMD EPYC (Zen 4) batch 1 7-12% (int8) and 11% (bf16, once its register tile left the
prefetching to the hardware: with its burst of software prefetches huge pages had made it 14% slower).

Which pages the weights got is read back from /proc/self/smaps, never assumed, and reported
(`engine.backends["weight_pages"]`; the bytes: `engine.model.weight_pages`). Nothing else changes: the same bytes,
the same kernels.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
ALIGN = 4096  # each weight starts on a page of its own
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_setting() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or why it is unknown."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "unavailable"
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "unavailable"


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` on an anonymous mapping advised MADV_HUGEPAGE, starting on a 2 MiB boundary (the
    tensor keeps the mapping alive). Raises OSError where the advice cannot be given."""
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)  # before the first write: the faults then take 2 MiB pages
    whole = torch.frombuffer(area, dtype=torch.uint8)
    skip = -whole.data_ptr() % HUGE_PAGE
    return whole[skip: skip + nbytes]


def huge_bytes(buffer: torch.Tensor) -> int:
    """Bytes of the mapping holding `buffer` that the kernel backs with huge pages (its AnonHugePages in smaps)."""
    address = buffer.data_ptr()
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class Placement:
    """Where the packed weights went: `pages` as engine.backends reports it ("2 MiB" where the kernel granted huge
    pages to any of them, else "4 KiB: why", "off ...", "default: ..."), and how many of their bytes are on huge
    pages (the kernel's count: it may differ by a page between two loads of one model)."""

    pages: str
    huge_bytes: int = 0
    total_bytes: int = 0


def place_weights(records: list[tuple[torch.Tensor, callable]]) -> Placement:
    """Copy each packed weight into one huge-page buffer, handing each its new tensor (`rebind(tensor)`); returns
    what the pages turned out to be. records: (packed tensor, rebind)."""
    if not records:
        return Placement("default: no packed weights of pyengine's own GEMMs")
    setting = thp_setting()
    if setting not in ("always", "madvise") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return Placement(f"4 KiB: transparent huge pages are {setting}")
    offsets, total = [], 0
    for tensor, _ in records:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    buffer = huge_page_buffer(total)
    before = huge_bytes(buffer)  # (the kernel may merge this mapping with an adjacent one: count what the copy adds)
    for (tensor, rebind), at in zip(records, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        placed = buffer[at: at + nbytes].view(tensor.dtype).view(tensor.shape)
        placed.copy_(tensor)
        rebind(placed)
    huge = min(max(huge_bytes(buffer) - before, 0), total)
    return Placement("2 MiB" if huge else f"4 KiB: none granted (transparent huge pages: {setting})", huge, total)
