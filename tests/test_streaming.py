"""The running top of a streaming pass (``helpers.analysis.streaming.merge_top``) against brute force."""

import pytest
import torch

from helpers.analysis import streaming


@pytest.mark.parametrize("kernel", [True, False])
def test_the_running_top_is_the_largest_seen_with_their_ids_and_carried_values(kernel, monkeypatch):
    """Batches of values (many ties: rounded, and zeros) merged one after another keep, per feature, the m largest of
    all seen, in descending order, each with its own id and carried value; of equal values the first seen ranks first
    (the Numba kernel; torch's fallback keeps the same values)."""
    if not kernel:
        monkeypatch.setattr(streaming, "numba", None)
    g = torch.Generator().manual_seed(0)
    m, n, batches, b = 5, 37, 9, 4
    best, best_loc = torch.full((n, m), -1.0), torch.full((n, m), -1, dtype=torch.long)
    carried = torch.zeros(n, m)
    seen_v, seen_id = [], []
    for i in range(batches):
        new = (torch.rand(b, n, generator=g) * 6).round() * (torch.rand(b, n, generator=g) < 0.7)
        ids = torch.arange(i * b, (i + 1) * b)[:, None].expand(b, n) * 100 + torch.arange(n)
        streaming.merge_top(best, best_loc, new, ids.contiguous(), carried, -new)
        seen_v.append(new)
        seen_id.append(ids)
    values, ids = torch.cat(seen_v), torch.cat(seen_id)
    for col in range(n):
        order = sorted(range(len(values)), key=lambda r: (-float(values[r, col]), r))[:m]  # first seen first
        want = values[order, col]
        assert torch.equal(best[col], want)
        assert torch.equal(carried[col], -best[col])
        if kernel:
            assert best_loc[col].tolist() == ids[order, col].tolist()
        else:  # ties may be kept otherwise: each id holds its value
            for v, loc in zip(best[col].tolist(), best_loc[col].tolist()):
                r = loc // 100
                assert float(values[r, col]) == v and loc % 100 == col
