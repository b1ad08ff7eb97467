"""local.SLOTTED_TEMPS (off by default until timed): a partitioned loop's temps whose uTask t touches only its
partition's slice, where a vEU runs several partitions, kept in its shared memory a slot per round (Plan.local_slots),
each call of the C family passed a pointer shifted for its uTask. Attention bs64 on 264 vEUs (3 rounds): q (t3) and
the context row (t12), 64 floats a partition. Checked on the plan, on the g++ emulator against the float64
reference (small Attention, several rounds a vEU) and compiled with NVRTC at full size."""
import re

import pytest
from strategies import emulated_model_mismatches, needs_cxx, needs_nvrtc, zoo_lowered

from gdsl.schedule import local

SHIFTED = re.compile(r"\(t\d+ \+ \(\(long long\)\(gdsl_t\) / (\d+) - \(gdsl_t\)\) \* (\d+)\)")


@pytest.fixture
def slotted(monkeypatch):
    monkeypatch.setattr(local, "SLOTTED_TEMPS", True)


def test_attention_bs64_keeps_q_and_the_context_a_slot_per_round(slotted):
    plan = zoo_lowered("attention", 64, grid=264).lowering.plan
    assert sorted((b.name, size, count, rounds) for b, size, count, rounds in plan.local_slots) == \
        [("t12", 64, 264, 3), ("t3", 64, 264, 3)]
    assert local.local_bytes(plan) == 2 * 3 * 64 * 4
    assert "t12 at +0 (3 slots of 64), t3 at +768 (3 slots of 64)" in str(plan)


def test_off_by_default_and_not_at_one_round():
    assert zoo_lowered("attention", 64, grid=264).lowering.plan.local_slots == ()
    local_bs1 = zoo_lowered("attention", 1).lowering.plan       # (one round: the whole index space, as before)
    assert local_bs1.local_slots == () and {b.name for b, _ in local_bs1.block_local} == {"t3", "t12"}


def test_no_room_past_the_resident_weights_no_slots(slotted):
    """On 396 vEUs (the default grid) each vEU's 64 KiB budget is the heads' weights: nothing is placed."""
    assert zoo_lowered("attention", 64).lowering.plan.local_slots == ()


@needs_cxx
@pytest.mark.parametrize("batch, grid", [(2, 2), (3, 4), (4, 3)])
def test_emulated_attention_with_slots_matches_its_reference(batch, grid, slotted, rendered_sources):
    """Small Attention (2 heads): 2 x batch partitions on fewer vEUs, so every vEU runs rounds."""
    assert emulated_model_mismatches("attention", batch, grid=grid, block=64, partition=True) == []
    assert any(SHIFTED.search(r.source) for r in rendered_sources)


@needs_nvrtc
def test_full_size_kernel_compiles(slotted):
    from gdsl.backends.cuda import toolchain as cuda_toolchain
    source = zoo_lowered("attention", 64, grid=264).source
    assert {m.groups() for m in SHIFTED.finditer(source)} == {("264", "64")}
    assert cuda_toolchain.compile_cuda(source, "sm_90")[:4] == b"\x7fELF"
