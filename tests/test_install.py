"""What an installed package relies on: the runtime engine built at install is not rebuilt at first use.

pip gives every file it unpacks the time it unpacked it, so an engine source can look newer than the
engine built from it; the loader compares the sources' sha256 with the one written at build time.
(The isolated wheel build, its tag and an install into a clean environment are exercised by .ci/run.)
"""
import os

import pytest

from fairseq_qruntime import build
from fairseq_qruntime.model import _stale


@pytest.fixture
def sources(tmp_path, monkeypatch):
    files = [tmp_path / "engine.cpp", tmp_path / "scalar.cpp"]
    for i, f in enumerate(files):
        f.write_text(f"int f{i}() {{ return {i}; }}\n")
    monkeypatch.setattr(build, "sources", lambda: [str(f) for f in files])
    return files


def built_library(tmp_path):
    """A stand-in for a built engine with the stamp build() writes (no compiler needed)."""
    lib = tmp_path / "_engine.so"
    lib.write_bytes(b"\x7fELF")
    with open(build.stamp_path(str(lib)), "w") as f:
        f.write(build.source_digest() + "\n")
    return lib


def test_engine_with_the_sources_it_was_built_from_is_not_stale_whatever_the_file_times(tmp_path, sources):
    lib = built_library(tmp_path)
    os.utime(lib, (1, 1))  # unpacked before its sources, as pip may do
    assert not _stale(str(lib))


def test_engine_is_stale_when_a_source_changed_or_its_sources_are_unknown(tmp_path, sources):
    lib = built_library(tmp_path)
    sources[1].write_text("int f1() { return 2; }\n")
    assert _stale(str(lib))
    os.unlink(build.stamp_path(str(lib)))
    sources[1].write_text("int f1() { return 1; }\n")
    assert _stale(str(lib))


def test_engine_without_its_sources_is_used_as_built(tmp_path, sources):
    lib = built_library(tmp_path)
    sources[0].unlink()
    assert build.source_digest() == ""
    assert not _stale(str(lib))


def test_build_writes_the_stamp_of_the_sources_it_compiled(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "true")  # a "compiler" that succeeds without writing anything
    out = build.build(str(tmp_path / "engine.so"))
    with open(build.stamp_path(out)) as f:
        assert f.read().strip() == build.source_digest() != ""
