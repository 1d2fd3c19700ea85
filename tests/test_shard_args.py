"""--shards as users write it: brace patterns, globs, directories, and comma-separated lists of those."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.common import JobError, expand_shards, split_top_level_commas


@pytest.fixture()
def tars(tmp_path) -> Path:
    for name in ("a-000000.tar", "a-000001.tar", "b-000000.tar", "c.tar"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_split_keeps_commas_inside_braces():
    assert split_top_level_commas("a.tar,b.tar") == ["a.tar", "b.tar"]
    assert split_top_level_commas("x-{0,1}.tar, y.tar,") == ["x-{0,1}.tar", "y.tar"]
    assert split_top_level_commas("s3://b/v-{000000..000002}.tar") == ["s3://b/v-{000000..000002}.tar"]
    assert split_top_level_commas(" , ") == []


def test_comma_separated_lists_mix_every_form(tars):
    d = str(tars)
    assert expand_shards([f"{d}/a-000000.tar,{d}/c.tar"]) == [f"{d}/a-000000.tar", f"{d}/c.tar"]
    assert expand_shards([f"{d}/a-{{000000,000001}}.tar,{d}/b-*.tar"]) == [
        f"{d}/a-000000.tar", f"{d}/a-000001.tar", f"{d}/b-000000.tar"]
    assert expand_shards([f"{d}/a-{{000000..000001}}.tar", f"{d}/c.tar,{d}/b-000000.tar"]) == [
        f"{d}/a-000000.tar", f"{d}/a-000001.tar", f"{d}/c.tar", f"{d}/b-000000.tar"]
    assert len(expand_shards([f"{d},"])) == 4  # a directory in a list


def test_a_missing_or_repeated_shard_in_a_list_is_named(tars):
    d = str(tars)
    with pytest.raises(JobError, match=f"^shard {d}/missing.tar does not exist$"):
        expand_shards([f"{d}/c.tar,{d}/missing.tar"])
    with pytest.raises(JobError, match="two shards share the file name c.tar"):
        expand_shards([f"{d}/c.tar,{d}/c.tar"])


def test_attribute_cli_takes_a_comma_separated_list(tars, capsys):
    """The user's first try, `--shards a.tar,b.tar`, is split: the error names the one shard that is missing
    (it used to say "shard a.tar,b.tar does not exist")."""
    from jobs.attribute import main

    d = str(tars)
    with pytest.raises(SystemExit) as exit_info:
        main(["--shards", f"{d}/c.tar,{d}/nope.tar", "--model", "resnet18", "--methods", "gbp",
              "--out", str(tars / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: shard {d}/nope.tar does not exist"
