"""Seeds and the ComfyUI denoise schedule (spec §5, §8; reference §6.6–6.7, Q10)."""

import math

import pytest

from facedetailer.seeds import SEED_MODULUS, comfy_denoise_schedule, sampling_seed


def test_seed_is_base_plus_image_plus_segment_plus_cycle():
    assert sampling_seed(5, 1, 2, 3) == 11


def test_seed_collisions_are_kept():
    # Q10: image 0 / segment 1 and image 1 / segment 0 share a seed, and so does cycle 1
    assert sampling_seed(100, 0, 1, 0) == sampling_seed(100, 1, 0, 0) == sampling_seed(100, 0, 0, 1)


def test_seed_wraps_modulo_2_to_the_64():
    assert SEED_MODULUS == 2**64
    assert sampling_seed(2**64 - 1, 0, 1, 0) == 0
    assert sampling_seed(2**64 - 1, 1, 1, 1) == 2


def test_explicit_wildcard_seed_replaces_seed_plus_k_plus_i_but_cycles_still_add():
    # [SEP:123]: the caller passes the explicit seed as the base with k = i = 0
    assert [sampling_seed(123, 0, 0, c) for c in range(3)] == [123, 124, 125]


@pytest.mark.parametrize(
    ("steps", "denoise", "total", "start"),
    [
        (20, 0.5, 40, 20),
        (20, 1.0, 20, 0),
        (20, 0.1, 200, 180),
        (20, 0.3, 66, 46),  # floor(66.67)
        (1, 0.0001, 10000, 9999),
        (7, 0.07, 99, 92),  # ComfyUI's float int(7 / 0.07) = int(99.999…) = 99, kept on purpose
        (20, 0.99995, 20, 0),  # above 0.9999 ComfyUI runs the plain schedule
    ],
)
def test_denoise_schedule(steps, denoise, total, start):
    schedule = comfy_denoise_schedule(steps, denoise)
    assert (schedule.total_steps, schedule.start_index, schedule.executed_steps) == (total, start, steps)


def test_denoise_one_gives_strength_one():
    assert comfy_denoise_schedule(20, 1.0).strength == 1.0
    assert comfy_denoise_schedule(20, 0.5).strength == 0.5


def test_strength_reproduces_the_step_count_in_diffusers_arithmetic():
    for steps in range(1, 61):
        for hundredths in range(1, 101):
            schedule = comfy_denoise_schedule(steps, hundredths / 100)
            assert schedule.total_steps == math.floor(steps / (hundredths / 100))
            assert 0 < schedule.strength <= 1
            # diffusers img2img: init_timestep = int(num_inference_steps * strength); t_start = T - that
            assert int(schedule.total_steps * schedule.strength) == steps
            assert schedule.total_steps - int(schedule.total_steps * schedule.strength) == schedule.start_index


def test_strength_is_robust_where_steps_over_total_rounds_down():
    # 1/49·49 = 0.999… in floats; the strength is nudged up so int(T·s) is still 1
    schedule = comfy_denoise_schedule(1, 1 / 49)
    assert schedule.total_steps == 49 and int(49 * schedule.strength) == 1


@pytest.mark.parametrize(("steps", "denoise"), [(0, 0.5), (20, 0.0), (20, 1.5)])
def test_invalid_schedule_inputs_are_rejected(steps, denoise):
    with pytest.raises(ValueError):
        comfy_denoise_schedule(steps, denoise)
