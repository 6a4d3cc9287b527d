"""Refinement waves keep the reference's order semantics for overlapping crops."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from facedetailer.waves import refinement_waves, regions_overlap


def test_disjoint_faces_share_one_wave():
    assert refinement_waves([(0, 0, 10, 10), (10, 0, 20, 10), (0, 10, 10, 20)]) == [[0, 1, 2]]


def test_touching_edges_do_not_overlap_but_one_shared_pixel_does():
    assert not regions_overlap((0, 0, 10, 10), (10, 0, 20, 10))
    assert regions_overlap((0, 0, 10, 10), (9, 9, 20, 20))


def test_chain_of_overlaps_gives_successive_waves():
    regions = [(0, 0, 10, 10), (5, 0, 15, 10), (12, 0, 22, 10), (100, 0, 110, 10)]
    assert refinement_waves(regions) == [[0, 3], [1], [2]]


def test_a_face_waits_for_the_latest_overlapping_earlier_face():
    regions = [(0, 0, 10, 10), (8, 0, 18, 10), (30, 0, 40, 10), (16, 0, 35, 10)]
    # face 3 overlaps face 1 (wave 1) and face 2 (wave 0): it goes to wave 2
    assert refinement_waves(regions) == [[0, 2], [1], [3]]


def test_empty():
    assert refinement_waves([]) == []


box = st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(1, 30), st.integers(1, 30)).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
)


@settings(max_examples=200, deadline=None)
@given(st.lists(box, max_size=8))
def test_waves_respect_every_overlap_dependency(regions):
    waves = refinement_waves(regions)
    wave_of = {position: w for w, members in enumerate(waves) for position in members}
    assert sorted(wave_of) == list(range(len(regions)))
    for j in range(len(regions)):
        for i in range(j):
            if regions_overlap(regions[i], regions[j]):
                assert wave_of[i] < wave_of[j]
    for members in waves:
        for a in members:
            for b in members:
                assert a == b or not regions_overlap(regions[a], regions[b])
