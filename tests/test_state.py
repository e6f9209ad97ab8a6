"""microadam_dist.state: the per-parameter state type (shapes, forms, checks, joining, packing)."""

import pytest
import torch

from microadam_dist.geometry import geometry_for
from microadam_dist.state import (
    DTYPES,
    FIELDS,
    StateLayout,
    narrow_indices,
    packed_shapes,
    packed_views,
    packed_zeros,
    widen_indices,
)

# (shape, block, bucket, density): rows with a short last block, a 1-D parameter, a scalar
GEOMETRIES = [((6, 150), 64, 16, 0.05), ((700,), 64, 16, 0.05), ((3, 4, 25), 32, 8, 0.1), ((), 64, 16, 0.05)]
WINDOW = 3


def _random_state(layout: StateLayout, seed: int = 0) -> dict:
    """Valid state with every byte distinct from zero-init: indices inside their blocks, lo <= hi."""
    gen = torch.Generator().manual_seed(seed)
    st = layout.zeros("cpu")
    st["step"].fill_(7)
    limits = layout.block_len_per_entry()
    st["window_idx"].copy_((torch.rand(st["window_idx"].shape, generator=gen) * limits).long())
    st["window_val"].copy_(torch.randn(st["window_val"].shape, generator=gen))
    st["ef_codes"].copy_(torch.randint(0, 256, st["ef_codes"].shape, generator=gen))
    lo = torch.randn(st["ef_stats"].shape[0], generator=gen)
    st["ef_stats"].copy_(torch.stack([lo, lo + torch.rand(lo.shape, generator=gen)], dim=-1))
    return st


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_zeros_have_the_spec_dtypes_and_the_geometry_sizes(geo):
    geom = geometry_for(*geo)
    layout = StateLayout(geom, WINDOW)
    st = layout.zeros("cpu")
    k, e, q = geom.state_sizes()
    assert tuple(st) == FIELDS
    assert {key: st[key].dtype for key in FIELDS} == DTYPES
    assert [tuple(st[key].shape) for key in FIELDS] == [(), (WINDOW, k), (WINDOW, k), (e,), (q, 2)]
    assert st["step"].device.type == "cpu" and all(not bool(t.any()) for t in st.values())
    # bytes counted exactly: int16 + bf16 per window entry, a byte per two codes, 8 per bucket, the step
    assert layout.nbytes() == geom.state_bytes(WINDOW) == sum(t.numel() * t.element_size() for t in st.values())


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_row_form_round_trip_and_shapes(geo):
    geom = geometry_for(*geo)
    layout = StateLayout(geom, WINDOW)
    st = _random_state(layout)
    rows = layout.to_rows(st)
    k_row, e_row, q_row = geom.per_row
    assert tuple(rows["window_idx"].shape) == (WINDOW, geom.rows, k_row)
    assert tuple(rows["ef_codes"].shape) == (geom.rows, e_row) and tuple(rows["ef_stats"].shape) == (
        geom.rows,
        q_row,
        2,
    )
    assert rows["window_val"].data_ptr() == st["window_val"].data_ptr()  # views, no copy
    back = layout.from_rows(rows)
    for key in FIELDS:
        assert torch.equal(back[key], st[key]), key
        assert back[key].data_ptr() != st[key].data_ptr() and back[key].is_contiguous(), key  # own copies


@pytest.mark.parametrize("geo", GEOMETRIES[:3])
def test_any_cut_into_block_ranges_joins_back_to_the_whole(geo):
    geom = geometry_for(*geo)
    whole = StateLayout(geom, WINDOW)
    st = _random_state(whole, seed=1)
    rows = whole.to_rows(st)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        cuts = sorted(set(torch.randint(0, geom.num_blocks + 1, (3,), generator=gen).tolist()) | {0, geom.num_blocks})
        parts = []
        for b0, b1 in zip(cuts, cuts[1:]):
            part = StateLayout(geom, WINDOW, b0, b1)
            flat = part.from_rows(rows)  # cut out of the whole parameter's row form
            assert [tuple(flat[key].shape) for key in FIELDS] == [tuple(s) for s in part.flat_shapes().values()]
            parts.append((b0, b1, flat))
        joined = StateLayout.join(geom, WINDOW, parts[::-1])  # any order
        for key in FIELDS:
            assert torch.equal(joined[key], rows[key]), key
    with pytest.raises(ValueError, match="held by no rank"):
        StateLayout.join(geom, WINDOW, [p for p in parts if p[0] != 0])


def test_a_range_of_whole_rows_reads_its_own_row_form():
    geom = geometry_for((6, 150), 64, 16, 0.05)  # 3 blocks per row
    layout = StateLayout(geom, WINDOW, 3, 9)  # rows 1 and 2
    assert layout.rows == 2 and StateLayout(geom, WINDOW, 1, 3).rows is None
    st = _random_state(layout)
    back = layout.from_rows(layout.to_rows(st))
    assert all(torch.equal(back[key], st[key]) for key in FIELDS)
    with pytest.raises(ValueError, match="not whole rows"):
        StateLayout(geom, WINDOW, 1, 3).row_shapes()
    with pytest.raises(ValueError, match="outside"):
        StateLayout(geom, WINDOW, 0, geom.num_blocks + 1)


class Refused(Exception):
    pass


def test_check_names_the_field_and_raises_the_callers_error():
    geom = geometry_for((6, 150), 64, 16, 0.05)
    layout = StateLayout(geom, WINDOW)
    good = layout.zeros("cpu")
    layout.check(good, "p")
    layout.check(layout.to_rows(good), "p", rows=True)
    with pytest.raises(Refused, match="another optimizer"):
        layout.check({"exp_avg": torch.zeros(3)}, "p", error=Refused)
    with pytest.raises(Refused, match=r"state 'window_val' of p is torch.float32"):
        layout.check({**good, "window_val": good["window_val"].float()}, "p", error=Refused)
    with pytest.raises(ValueError, match="another model"):
        layout.check({**good, "ef_codes": torch.zeros(3, dtype=torch.uint8)}, "p", hint="another model")
    with pytest.raises(ValueError, match="expected a tensor"):
        layout.check({**good, "step": 3}, "p")


def test_check_values_finds_damaged_state():
    geom = geometry_for((6, 150), 64, 16, 0.05)
    layout = StateLayout(geom, WINDOW)
    st = _random_state(layout)
    layout.check_values(st, "p")
    bad_index = {k: v.clone() for k, v in st.items()}
    bad_index["window_idx"][0, -1] = 22  # the last entry of a row indexes its 22-element short block
    with pytest.raises(ValueError, match="outside their blocks"):
        layout.check_values(bad_index, "p")
    bad_stats = {k: v.clone() for k, v in st.items()}
    bad_stats["ef_stats"][0] = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="disordered"):
        layout.check_values(bad_stats, "p")
    with pytest.raises(ValueError, match="negative step"):
        layout.check_values({**st, "step": torch.tensor(-1)}, "p")


def test_install_copies_and_keeps_the_saved_dtypes():
    geom = geometry_for((700,), 64, 16, 0.05)
    layout = StateLayout(geom, WINDOW)
    wide = layout.zeros("cpu")
    saved = {key: value[:, :].t().contiguous().t() if value.dim() == 2 else value for key, value in wide.items()}
    got = layout.install(saved, "cpu")
    assert {key: got[key].dtype for key in FIELDS} == DTYPES  # torch's own loader would cast bf16/fp32 state
    assert all(got[key].data_ptr() != saved[key].data_ptr() and got[key].is_contiguous() for key in FIELDS)


def test_packed_views_write_through_to_the_packed_tensors():
    geoms = [geometry_for(*g) for g in GEOMETRIES[:3]]
    layouts = [StateLayout(g, WINDOW, 1, g.num_blocks) for g in geoms]
    packed = packed_zeros(layouts, "cpu")
    shapes = packed_shapes(layouts)
    assert tuple(packed["step"].shape) == (3,) and {k: tuple(v.shape) for k, v in packed.items()} == shapes
    assert shapes["window_idx"][1] == sum(layout.sizes[0] for layout in layouts)
    for j, view in enumerate(packed_views(layouts, packed)):
        fresh = _random_state(layouts[j], seed=j)
        for key in FIELDS:
            view[key].copy_(fresh[key])
    for j, view in enumerate(packed_views(layouts, packed)):  # read back through new views
        fresh = _random_state(layouts[j], seed=j)
        assert all(torch.equal(view[key], fresh[key]) for key in FIELDS)
    assert packed["step"].tolist() == [7, 7, 7]


def test_indices_widen_for_collectives_and_narrow_back():
    st = StateLayout(geometry_for((700,), 64, 16, 0.05), WINDOW).zeros("cpu")
    st["window_idx"][0, 0] = 63
    wide = widen_indices(st)
    assert wide["window_idx"].dtype == torch.int32 and st["window_idx"].dtype == torch.int16
    assert torch.equal(narrow_indices(wide)["window_idx"], st["window_idx"])
    assert narrow_indices(st) is st  # int16 state (saved before the export dtype) loads as it is
    wide["window_idx"][0, 0] = 1 << 20
    with pytest.raises(ValueError, match="int16 range"):
        narrow_indices(wide)
