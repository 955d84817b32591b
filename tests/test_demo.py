"""`python -m ifunc demo`: options, figure, exit code (CI also runs the default demo)."""

import pytest
import torch

from ifunc.__main__ import main, spearman


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 40, generator=gen), torch.randn(3, 40, generator=gen)
    b = b + a
    ours = spearman(a, b)
    for row in range(3):
        assert ours[row].item() == pytest.approx(stats.spearmanr(a[row], b[row]).statistic, abs=1e-12)


def test_leave_one_out_only(capsys):
    assert main(["demo", "--loo"]) == 0
    out = capsys.readouterr().out
    assert "leave-one-out check" in out and "digits" not in out


@pytest.mark.slow
def test_digits_demo_options_and_figure(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    assert (
        main(
            [
                "demo",
                "--no-loo",
                "--method",
                "kfac",
                "--reference",
                "explicit",
                "--queries",
                "2",
                "--damping",
                "0.1",
                "--n-train",
                "300",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Spearman(kfac, explicit)" in out and out.count("most harmful") == 2
    assert png.stat().st_size > 10_000


def test_bad_queries_exit():
    with pytest.raises(SystemExit):
        main(["demo", "--queries", "0"])
