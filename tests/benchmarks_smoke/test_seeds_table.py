"""benchmarks.seeds_table: per-seed paired tests from the rank files, and the seed-averaged test
over the users every seed ranked."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from benchmarks.seeds_table import main, seed_averaged, seed_rows
from tasks import io


def write_ranks(root, seed_dir: str, ranks: dict[str, list[int]], users: list[int], sub: str = "eval") -> str:
    where = root / seed_dir / "ml-100k" / sub
    where.mkdir(parents=True)
    for method, r in ranks.items():
        pl.DataFrame({"user_id": users, "rank": r}).write_parquet(where / f"{method}.parquet")
    return str(root / seed_dir)


def test_seed_averaged_is_the_paired_test_of_per_user_means(tmp_path):
    users = [3, 1, 2, 0]
    # Hits@10 of users 0..3 (rows given in the order of `users`): base A 1,0,0,1 and B 1,0,1,0;
    # other A 1,1,0,1 and B 1,1,1,1.
    a = write_ranks(tmp_path, "a", {"base": [1, 0, 50, 2], "other": [1, 3, 0, 4]}, users)
    b = write_ranks(tmp_path, "b", {"base": [0, 0, 3, 9], "other": [1, 5, 7, 8]}, users)
    runs = [seed_rows(tmp_path / d / "ml-100k" / "eval", ["base", "other"], 100)[1:] for d in ("a", "b")]
    got = seed_averaged(runs, "base", ["base", "other"], 200)
    # per user: base means 1, 0, 0.5, 0.5; other 1, 1, 0.5, 1
    assert got["other"]["recall@10"]["diff"] == pytest.approx(np.mean([0.0, 1.0, 0.0, 0.5]))
    assert set(got) == {"other"}
    out = main(["--dataset", "ml-100k", "--dirs", a, b, "--methods", "base", "other", "--bootstrap", "200",
                "--out", str(tmp_path / "t.json")])
    assert io.read_json(tmp_path / "t.json")["seed_averaged_vs_base"]["other"]["recall@10"]["diff"] == \
        pytest.approx(0.375)
    assert out["seeds"][a]["methods"]["other"]["vs_base"]["recall@10"]["diff"] == pytest.approx(0.25)
    assert out["seeds"][b]["methods"]["other"]["vs_base"]["recall@10"]["diff"] == pytest.approx(0.5)


def test_seeds_over_different_users_get_no_seed_averaged_test(tmp_path):
    write_ranks(tmp_path, "a", {"base": [1, 0], "other": [1, 1]}, [0, 1])
    write_ranks(tmp_path, "b", {"base": [1, 0], "other": [1, 1]}, [0, 2])
    runs = [seed_rows(tmp_path / d / "ml-100k" / "eval", ["base", "other"], 100)[1:] for d in ("a", "b")]
    assert seed_averaged(runs, "base", ["base", "other"], 100) == {}


def test_champion_stands_for_each_seeds_validation_winner(tmp_path):
    a = write_ranks(tmp_path, "a", {"base": [1, 0], "other": [2, 1]}, [0, 1])
    b = write_ranks(tmp_path, "b", {"base": [1, 0], "other": [2, 1]}, [0, 1])
    io.write_json(tmp_path / "a" / "ml-100k" / "eval" / "leaderboard.json",
                  {"champion": "other", "tiger_cf_weight": {"chosen": 2.0}})
    io.write_json(tmp_path / "b" / "ml-100k" / "eval" / "leaderboard.json", {"champion": "base"})
    out = main(["--dataset", "ml-100k", "--dirs", a, b, "--methods", "base", "champion", "--bootstrap", "100"])
    assert [out["seeds"][d]["champion"] for d in (a, b)] == ["other", "base"]
    assert out["seeds"][a]["tiger_cf_weight"] == 2.0 and "tiger_cf_weight" not in out["seeds"][b]
    assert out["seeds"][a]["methods"]["champion"]["metrics"]["recall@10"] == pytest.approx(1.0)
    assert out["seeds"][a]["methods"]["champion"]["vs_base"]["recall@10"]["diff"] == pytest.approx(0.5)
    assert out["seeds"][b]["methods"]["champion"]["vs_base"]["recall@10"]["diff"] == pytest.approx(0.0)


def test_rank_files_can_live_in_another_subdir(tmp_path):
    a = write_ranks(tmp_path, "a", {"base": [1, 0], "late_fusion": [1, 1]}, [0, 1], sub="eval_fusion")
    out = main(["--dataset", "ml-100k", "--dirs", a, "--methods", "base", "late_fusion", "--bootstrap", "100",
                "--eval-subdir", "eval_fusion"])
    assert out["seeds"][a]["methods"]["late_fusion"]["vs_base"]["recall@10"]["diff"] == pytest.approx(0.5)


def test_champion_can_be_chosen_again_by_a_default_rule(tmp_path):
    # Validation hits of 8 users: base 4, other 5 (one user more: p about 0.7), strong 8 (p 0).
    users = list(range(8))
    a = write_ranks(tmp_path, "a", {"base": [1] * 8, "other": [1] * 8}, users)  # test ranks: all hits
    write_ranks(tmp_path, "a", {"base": [1, 1, 1, 1, 0, 0, 0, 0], "other": [1, 1, 1, 1, 1, 0, 0, 0]}, users,
                sub="eval/valid")
    b = write_ranks(tmp_path, "b", {"base": [1] * 8, "strong": [0] * 8}, users)
    write_ranks(tmp_path, "b", {"base": [1, 1, 1, 1, 0, 0, 0, 0], "strong": [1] * 8}, users, sub="eval/valid")
    io.write_json(tmp_path / "a" / "ml-100k" / "eval" / "leaderboard.json", {"champion": "other"})
    kept = main(["--dataset", "ml-100k", "--dirs", a, "--methods", "base", "champion", "--bootstrap", "200",
                 "--champion-default", "base"])
    assert kept["seeds"][a]["champion"] == "base" and kept["champion_rule"] == {"default": "base", "p": 0.05}
    plain = main(["--dataset", "ml-100k", "--dirs", a, "--methods", "base", "champion", "--bootstrap", "200",
                  "--champion-default", ""])
    assert plain["seeds"][a]["champion"] == "other"
    beaten = main(["--dataset", "ml-100k", "--dirs", b, "--methods", "base", "champion", "--bootstrap", "200",
                   "--champion-default", "base"])
    assert beaten["seeds"][b]["champion"] == "strong"
    # the champion's test ranks are the chosen method's: strong misses every test user
    assert beaten["seeds"][b]["methods"]["champion"]["metrics"]["recall@10"] == 0.0


def test_against_compares_each_method_with_itself_under_the_other_configuration(tmp_path):
    users = [0, 1, 2, 3]
    # Ranks are 1-based, 0 = absent. Hits@10: new config seed A base 1,1,0,0 / B 1,0,0,0; old config seed A base 0,0,0,0 / B 1,0,0,1.
    new_a = write_ranks(tmp_path, "na", {"base": [1, 2, 0, 20]}, users)
    new_b = write_ranks(tmp_path, "nb", {"base": [1, 0, 11, 20]}, users)
    old_a = write_ranks(tmp_path, "oa", {"base": [0, 11, 12, 13]}, users)
    old_b = write_ranks(tmp_path, "ob", {"base": [1, 11, 12, 3]}, users)
    out = main(["--dataset", "ml-100k", "--dirs", new_a, new_b, "--against", old_a, old_b, "--methods", "base",
                "--bootstrap", "200", "--out", str(tmp_path / "t.json")])
    # per user: new means 1, 0.5, 0, 0; old 0.5, 0, 0, 0.5 -> new minus old 0.5, 0.5, 0, -0.5
    assert out["vs_against"]["base"]["recall@10"]["diff"] == pytest.approx(0.125)
    assert io.read_json(tmp_path / "t.json")["against"] == [old_a, old_b]
    # per seed: A 0.5 against 0, B 0.25 against 0.5
    pairs = out["per_seed_vs_against"]["base"]
    assert [(p["dir"], p["against"]) for p in pairs] == [(new_a, old_a), (new_b, old_b)]
    assert [p["recall@10_diff"] for p in pairs] == pytest.approx([0.5, -0.25])
    assert [p["recall@10_against"] for p in pairs] == pytest.approx([0.0, 0.5])
    with pytest.raises(ValueError, match="one per seed"):
        main(["--dataset", "ml-100k", "--dirs", new_a, new_b, "--against", old_a, "--methods", "base"])
    other_users = write_ranks(tmp_path, "ou", {"base": [0, 1, 2]}, [0, 1, 5])
    with pytest.raises(ValueError, match="different users"):
        main(["--dataset", "ml-100k", "--dirs", new_a, "--against", other_users, "--methods", "base"])
