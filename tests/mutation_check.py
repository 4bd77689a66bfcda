"""Mutation check: plants small plausible bugs in kfac_ext, one at a time, and checks that the
tests catch every one of them.

Run it by hand, from any directory, with the Python of a venv where kfac_ext is installed (built
from this checkout) together with pytest and the test dependencies:

    .venv/bin/python tests/mutation_check.py              # every mutation
    .venv/bin/python tests/mutation_check.py --list       # names, files and tests
    .venv/bin/python tests/mutation_check.py pi-swapped kfac-off   # some of them
    .venv/bin/python tests/mutation_check.py --show ...   # with the failure messages

It takes about 4 minutes on a 2-core machine: about 1 for the unmutated baseline run, 1 for the
mutation the distributed tests check (they spawn gloo processes), 4 to 9 seconds for each other
one (mostly pytest's start-up); it prints the time of each run. The pytest runs use one BLAS
thread (OMP_NUM_THREADS=1 unless set): on a 2-core machine shared with other work, two spinning
threads made single tests 40 times slower. Exit status 0 iff every mutation was caught.

How: the INSTALLED package (the directory ``import kfac_ext`` finds, with its compiled
``_C*.so``) is copied to a temporary directory, and the tests run with ``PYTHONPATH`` set to it,
so that the copy shadows the installed package (checked first: a canary copy that raises on
import must make the tests fail with its message). Before any mutation, the union of all the
tests named below must pass on the unmutated copy (``--skip-baseline`` skips that). Then, for
each mutation, its file in the copy gets one snippet replaced, and its own subset of tests runs:
the mutation is caught iff pytest reports failed tests (exit status 1); any other outcome
(everything passed, collection or import errors, no tests collected) fails the check.

Each mutation is (name, file relative to kfac_ext/, exact old snippet, new snippet, tests, why it
is plausible). A snippet must occur exactly once in its file: when the code changes (the
refactor), a snippet that is no longer found stops the check before anything runs, naming it, to
be re-targeted. Keep them short and specific.

The golden-value tests (tests/test_bit_identity.py, test_distributed.py's
test_scenarios_match_golden) would catch almost any numerical change; no subset includes them,
so each mutation must be caught by a test that states what the code should do.

The installed package must be the one in this checkout: the script stops if the installed
kfac_ext/*.py differ from the checkout's (reinstall, or pass ``--allow-stale``).
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CANARY = "kfac_ext mutation canary: the temporary copy was imported"

T_LAYERS = "tests/test_layers.py"
T_FACTORS = "tests/test_factors.py"
T_OPT = "tests/test_optimizer.py"
T_FAST = "tests/test_fast_step.py"
T_REAL = "tests/test_real_models.py"
T_ROBUST = "tests/test_robustness.py"
T_CKPT = "tests/test_amp_and_checkpoints.py"
T_DIST = "tests/test_distributed.py"
T_RULES = "tests/test_update_rules.py"
T_KRON = "tests/test_kronecker.py"

EXACT_FISHER = [f"{T_LAYERS}::test_exact_fisher_embedding_one_token", f"{T_LAYERS}::test_exact_fisher_hf_conv1d_one_input",
                f"{T_LAYERS}::test_exact_fisher_conv1d_reduce_with_mean_pooling_not_expand",
                f"{T_LAYERS}::test_exact_fisher_linear_expand_per_position_mse",
                f"{T_LAYERS}::test_exact_fisher_attention_one_token",
                f"{T_FACTORS}::test_kfac_equals_exact_fisher_block_for_one_layer_on_one_input"]
NATIVE_VS_REFERENCE = f"{T_OPT}::test_native_matches_reference"
GROUPED = f"{T_FAST}::test_grouped_preconditioning_is_per_block_solve"
EVERY_INVERSION = f"{T_FAST}::test_every_inversion_replaces_the_stacked_inverses"


def _cases(test: str, *ids: str) -> list[str]:
    return [f"{test}[{i}]" for i in ids]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to kfac_ext/
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids (a test function: all its cases)
    why: str


def _m(name, file, old, new, tests, why) -> Mutation:
    return Mutation(name, file, old, new, tuple(tests), why)


MUTATIONS = [
    _m("mean-1/M-dropped", "capture.py",
       'w = 1.0 / self.terms if settings.reduction == "mean" else 1.0',
       "w = 1.0",
       EXACT_FISHER,
       "the per-term G of a mean loss forgets the 1/M (the same weight as for reduction='sum')"),
    _m("ce-hessian-sqrt-dropped", "losses.py",
       "cols = p.movedim(-1, 0).sqrt().unsqueeze(-1) * (",
       "cols = p.movedim(-1, 0).unsqueeze(-1) * (",
       EXACT_FISHER[:3] + EXACT_FISHER[4:],
       "the Hessian root's columns weighted by p_k instead of sqrt(p_k)"),
    _m("pi-swapped", "curvature.py",
       "return factors, [pi * root for pi in pis] + [root / pi for pi in pis]",
       "return factors, [root / pi for pi in pis] + [pi * root for pi in pis]",
       [*_cases(NATIVE_VS_REFERENCE, "float32-eigen-pi-mlp", "float64-eigen-pi-mlp", "float32-cholesky-pi-cnn",
                "float64-cholesky-pi-cnn"),
        *_cases(GROUPED, "eigen-pi-native", "cholesky-pi-native"), EVERY_INVERSION],
       "π multiplies G's damping and divides A's (π² = (tr A/dim A)/(tr G/dim G) read upside down)"),
    _m("pi-swapped-cholesky", "inverse.py",
       "inverses, status = self.ops.damped_inverse(factors, damping)",
       "inverses, status = self.ops.damped_inverse(factors, damping[len(damping) // 2:] + damping[:len(damping) // 2])",
       [*_cases(NATIVE_VS_REFERENCE, "float32-cholesky-pi-mlp", "float64-cholesky-pi-mlp", "float64-cholesky-pi-cnn"),
        *_cases(GROUPED, "cholesky-pi-native", "cholesky-pi-reference"), f"{EVERY_INVERSION}[cholesky]"],
       "the Cholesky path pairs the factor list [A..., G...] with the damping list in the other order"),
    _m("pi-swapped-eigen", "inverse.py",
       "results = [Inverse((q * (1.0 / (lam + d))) @ q.mT) for lam, q, d in zip(values, vectors, damping)]",
       "results = [Inverse((q * (1.0 / (lam + d))) @ q.mT) for lam, q, d in zip(values, vectors,"
       " damping[len(damping) // 2:] + damping[:len(damping) // 2])]",
       [*_cases(NATIVE_VS_REFERENCE, "float32-eigen-pi-cnn", "float64-eigen-pi-mlp", "float64-eigen-pi-cnn"),
        *_cases(GROUPED, "eigen-pi-native", "eigen-pi-reference"), f"{EVERY_INVERSION}[eigen]"],
       "the eigen path (inverse form) pairs the eigenpairs with the damping list in the other order"),
    _m("kfac-off", "preconditioner.py",
       "updates = self.topology.precondition(blocks, grads, lambda b, g: self.inverses.apply(b, g, gamma))",
       "updates = [g.clone() for g in grads]",
       [*_cases(NATIVE_VS_REFERENCE, "float64-eigen-tikhonov-mlp", "float32-cholesky-pi-cnn", "float64-eigen-eigen-cnn"),
        f"{T_REAL}::test_gpt2[mc-expand]", f"{T_REAL}::test_bert_sequence_classification[type-2-reduce]",
        f"{T_REAL}::test_transformer_encoder[empirical-expand]", f"{T_REAL}::test_resnet18[mc-reduce]",
        f"{T_REAL}::test_conv1d_network[type-2-expand]"],
       "the inverses are never applied: the raw gradient goes through (the KL clip still scales it)"),
    _m("load-state-dict-no-move", "preconditioner.py",
       "return t.to(devices[name], copy=True) if isinstance(t, Tensor) else t",
       "return t.clone() if isinstance(t, Tensor) else t",
       [f"{T_CKPT}::test_load_state_dict_moves_every_tensor_to_the_blocks_device"],
       "the checkpoint's tensors are copied but stay on the device they were saved (or mapped) on"),
    _m("cpu-in-kl-clip", "inverse.py",
       "vg = total(vg) * lr**2",
       "vg = total(vg).cpu() * lr**2",
       [f"{T_FAST}::test_steady_state_preconditioner_step_reads_nothing_back",
        f"{T_FAST}::test_steady_state_kfac_step_reads_nothing_back_and_skips_on_device",
        f"{T_FAST}::test_steady_state_step_on_meta_moves_nothing_to_the_host"],
       "the clip's scalar is brought to the host 'to be safe': a device synchronization at every step"),
    _m("stale-stacked-inverses", "inverse.py",
       "            self.records[block.name] = (sides[0], sides[1])\n        self._groups = {}\n",
       "            self.records[block.name] = (sides[0], sides[1])\n",
       [EVERY_INVERSION, GROUPED, *_cases(NATIVE_VS_REFERENCE, "float64-eigen-tikhonov-mlp", "float64-cholesky-pi-cnn")],
       "the cache of stacked inverses is not invalidated after an inversion: stale inverses are used"),
    _m("empirical-k-not-k2", "capture.py",
       'weight = k**2 * self.terms if self.settings.reduction == "mean" else float(k**2)',
       'weight = k * self.terms if self.settings.reduction == "mean" else float(k)',
       [f"{T_OPT}::test_grad_accumulation_matches_concatenated_batch", f"{T_LAYERS}::test_accumulation_equals_one_big_batch"],
       "the 1/k of each micro-batch loss undone once instead of squared in g gᵀ"),
    _m("distributed-global-batch-weighting", "curvature.py",
       "(forwards / rows[block.name] if rows is not None else 1.0)",
       "((forwards / rows[block.name] if topology.world_size == 1 else forwards * topology.world_size"
       " / float(topology.all_sum(torch.tensor(float(rows[block.name]), dtype=torch.float64,"
       " device=topology.device)))) if rows is not None else 1.0)",
       [f"{T_DIST}::test_unequal_batches_average_each_ranks_own_statistics"],
       "A averaged over the global batch's rows instead of each rank's (documented: the mean of the ranks' "
       "statistics); the same with equal per-rank batches"),
    _m("unused-bias-gradient-ones", "layers/base.py",
       "self.bias.grad = torch.zeros_like(self.bias)",
       "self.bias.grad = torch.ones_like(self.bias)",
       [f"{T_OPT}::test_an_unused_bias_gets_a_gradient"],
       "ones_like for zeros_like (the ones column of A is next door): an unused bias gets a gradient it never had"),
    _m("ema-weights-swapped", "curvature.py",
       "store[block.name].mul_(keep).add_(total, alpha=(1 - keep) * weight)",
       "store[block.name].mul_(1 - keep).add_(total, alpha=keep * weight)",
       [f"{T_OPT}::test_factor_decay_schedule", f"{T_FACTORS}::test_factor_ema_and_update_period"],
       "ρ and 1 - ρ exchanged in F ← ρ F + (1-ρ) F_step (a step's one micro-batch, not folded)"),
    _m("folded-ema-weights-swapped", "curvature.py",
       "self.old_weight[key] = keep if name in store and keep > 0 else 0.0",
       "self.old_weight[key] = 1 - keep if name in store and keep > 0 else 0.0",
       [f"{T_FACTORS}::test_factor_ema_and_update_period"],
       "the old factor weighed 1 - ρ, not ρ, where the step's statistics were folded in as they came"),
    _m("ones-column-dropped-attention", "layers/attention.py",
       "weight=weight, bias=module.in_proj_bias)",
       "weight=weight, bias=None)",
       [f"{T_LAYERS}::test_multihead_attention_blocks", f"{T_LAYERS}::test_multihead_attention_grad_written_to_packed_rows"],
       "q/k/v blocks built without their rows of in_proj_bias: no ones column in their activation rows"),
    _m("ones-column-first-reference", "reference.py",
       "xbar = torch.cat([xbar, xbar.new_ones(xbar.shape[0], 1)], dim=1)",
       "xbar = torch.cat([xbar.new_ones(xbar.shape[0], 1), xbar], dim=1)",
       [f"{T_FACTORS}::test_reference_backend_factors_match_float64_hand_computation",
        *_cases(NATIVE_VS_REFERENCE, "float64-eigen-tikhonov-mlp")],
       "the homogeneous coordinate prepended instead of appended last (the README's convention)"),
    _m("frozen-bias-gets-ones-column", "layers/base.py",
       "self.bias: nn.Parameter | None = bias if bias is not None and bias.requires_grad else None",
       "self.bias: nn.Parameter | None = bias",
       [f"{T_LAYERS}::test_frozen_bias_has_no_ones_column_and_no_grad"],
       "a frozen bias treated as trainable: a ones column and an update it must not get"),
    _m("kl-clip-without-lr2", "inverse.py",
       "vg = total(vg) * lr**2",
       "vg = total(vg)",
       [f"{T_OPT}::test_kl_clip_rescales_the_update", f"{T_OPT}::test_step_lr_scheduler",
        f"{T_REAL}::test_gpt2[type-2-expand]", f"{T_REAL}::test_conv1d_network[mc-expand]"],
       "the clip compares Σ⟨v, g⟩ with kl_clip, forgetting the lr² of lr² Σ⟨v, g⟩"),
    _m("kl-clip-not-capped-at-1", "inverse.py",
       "(kl_clip / vg.abs()).sqrt().clamp(max=1.0)",
       "(kl_clip / vg.abs()).sqrt()",
       [f"{T_OPT}::test_kl_clip_large_does_not_clip"],
       "ν = sqrt(kl_clip / KL) without min(1, ·): small steps are blown up"),
    _m("mc-weight-1/S-dropped", "capture.py",
       "return w / self.count",
       "return w",
       _cases(f"{T_FACTORS}::test_factors_match_float64_hand_computation", "mc-cross_entropy-mean-mlp",
              "mc-mse-sum-cnn", "mc-bce_with_logits-mean-seq"),
       "mc_samples sampled directions summed, not averaged"),
    _m("tikhonov-damping-one-side", "curvature.py",
       "return factors, [root] * (2 * n)",
       "return factors, [root] * n + [0.0] * n",
       [f"{T_OPT}::test_damping_schedule_is_used_at_each_step",
        *_cases(NATIVE_VS_REFERENCE, "float64-eigen-tikhonov-mlp", "float64-cholesky-tikhonov-cnn")],
       "√γ added to A only (G left undamped)"),
    _m("eigen-damping-square-root", "preconditioner.py",
       'gamma = float(value(self.damping, self.steps)) if self.damping_mode == "eigen" else 0.0',
       'gamma = float(value(self.damping, self.steps)) ** 0.5 if self.damping_mode == "eigen" else 0.0',
       [*_cases(NATIVE_VS_REFERENCE, "float64-eigen-eigen-mlp", "float32-eigen-eigen-cnn"),
        *_cases(GROUPED, "eigen-eigen-native")],
       "exact eigen damping given the factored damping's √γ"),
    _m("failed-inversion-identity", "inverse.py",
       "            return previous\n",
       "            return _identity(factor.shape[0], factor.dim() == 1, self.inverse_form, self.inv_dtype,"
       " factor.device)\n",
       [f"{T_ROBUST}::test_failed_inversion_keeps_previous_inverse_and_warns_once"],
       "a failed inversion falls back to the identity even when a previous inverse exists"),
    _m("inv-schedule-off-by-one", "preconditioner.py",
       "self.steps % max(1, int(value(self._inverse_schedule(), self.steps))) == 0",
       "(self.steps + 1) % max(1, int(value(self._inverse_schedule(), self.steps))) == 0",
       [f"{T_OPT}::test_inv_update_steps_schedule"],
       "inversions at steps k-1, 2k-1, ... (counting from 1) instead of 0, k, 2k"),
    _m("factor-update-steps-ignored", "preconditioner.py",
       "return self.steps % max(1, int(value(self.factor_update_steps, self.steps))) == 0",
       "return True",
       [f"{T_OPT}::test_factor_update_steps_schedule", f"{T_FACTORS}::test_factor_ema_and_update_period"],
       "factors updated at every step whatever factor_update_steps says"),
    _m("nonfinite-factor-step-keeps-gradients", "preconditioner.py",
       "block.mask_grad_(finite)  # finite is False: zeros",
       "pass  # finite is False: zeros",
       [f"{T_ROBUST}::test_nonfinite_gradient_preconditioner_zeroes_registered_grads",
        f"{T_ROBUST}::test_nonfinite_first_step_leaves_no_factors"],
       "a factor step with non-finite gradients leaves the NaN/inf gradients for the optimizer"),
    _m("nonfinite-step-keeps-gradients", "preconditioner.py",
       "g if self._scaled() else 0.0)",
       "g)",
       [f"{T_FAST}::test_steady_state_preconditioner_step_reads_nothing_back"],
       "a step with non-finite gradients passes them through (as with a grad scaler) instead of zeros"),
    _m("g-parts-counted-as-forwards", "curvature.py",
       "forwards = covered.get(block.name, 0)",
       "forwards = 1",
       [f"{T_LAYERS}::test_gradient_rows_are_reduced_as_the_backward_goes"],
       "every part of a forward's G folded (a sampled backward's rows reduced as it goes) weighed as a "
       "whole micro-batch: G divided by the parts, not the forwards"),
    _m("reduce-sums-activations", "layers/linear.py",
       "return positions_rows(_as_examples(x), self.approx, Tensor.mean)",
       "return positions_rows(_as_examples(x), self.approx, Tensor.sum)",
       [f"{T_LAYERS}::test_linear_on_sequences"],
       "K-FAC-reduce sums the activations over positions (as it does the output gradients)"),
    _m("causal-label-shift-dropped", "capture.py",
       "counted = torch.cat([counted[..., 1:], torch.zeros_like(counted[..., :1])], dim=-1)",
       "counted = counted",
       [f"{T_REAL}::test_gpt2[type-2-expand]"],
       "a causal LM's counted tokens taken from the labels unshifted (position t predicts label t + 1)"),
    _m("grad-scaler-scale-not-squared", "capture.py",
       "weight = weight / scale**2",
       "weight = weight / scale",
       [f"{T_ROBUST}::test_grad_scaler_empirical_factors_are_unscaled"],
       "the loss scale divided out of g once, not out of g gᵀ"),
    _m("eigen-adam-v-kept", "update.py",
       'state["exp_avg_sq"] = _rotate(state["exp_avg_sq"], (r_g * r_g).mT, None if r_a is None else r_a * r_a)',
       'pass',
       [f"{T_RULES}::test_eigen_adam_is_adam_in_the_factor_eigenbasis",
        f"{T_RULES}::test_mobilenet_v3_small_trains_from_its_first_bases_without_a_spike"],
       "Adam's second moments kept, not carried into the new eigenbasis (SOAP's choice)"),
    _m("eigen-adam-m-kept", "update.py",
       'state["exp_avg"] = _rotate(state["exp_avg"], r_g.mT, r_a)',
       'pass',
       [f"{T_RULES}::test_eigen_adam_is_adam_in_the_factor_eigenbasis"],
       "Adam's first moments left in the old eigenbasis"),
    _m("eigen-adam-no-bias-correction", "reference.py",
       "u = qg @ ((m / c1) / ((v / c2).sqrt() + eps))",
       "u = qg @ (m / (v.sqrt() + eps))",
       [f"{T_KRON}::test_eigen_adam_is_adam_in_the_eigenbasis",
        f"{T_RULES}::test_eigen_adam_is_adam_in_the_factor_eigenbasis"],
       "Adam's bias correction dropped in the eigenbasis (the reference the native op is held to)"),
    _m("eigen-adam-moments-swapped", "update.py",
       '[s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]',
       '[s["exp_avg_sq"] for s in states], [s["exp_avg"] for s in states]',
       [f"{T_RULES}::test_eigen_adam_is_adam_in_the_factor_eigenbasis"],
       "the blocks' first and second moments handed to the op in each other's place"),
    _m("subnormals-not-flushed", "preconditioner.py",
       "with flush_denormals():",
       "if True:",
       [f"{T_ROBUST}::test_step_runs_with_subnormals_flushed"],
       "the step run without flushing subnormals (the ResNet-18 inversion steps 2x slower)"),
    _m("factor-rows-offset-fixed", "statistics.py",
       "return slice(self.phase % stride, None, stride)",
       "return slice(0, None, stride)",
       [f"{T_FACTORS}::test_factor_rows_subsets_partition_the_rows_over_successive_updates"],
       "the row subset never moves on: the same rows every factor update (biased)"),
    _m("factor-rows-g-not-rescaled", "statistics.py",
       "return rows, weight if scale == 1.0 else weight * scale",
       "return rows, weight",
       [f"{T_FACTORS}::test_factor_rows_subsets_partition_the_rows_over_successive_updates"],
       "the subsampled G sum not rescaled to all rows"),
    _m("factor-rows-stride-shares-a-divisor", "statistics.py",
       "        while math.gcd(stride, n) != 1:\n",
       "        while False:\n",
       [f"{T_FACTORS}::test_row_subsets_take_every_position_of_an_example"],
       "a stride dividing the positions per example: the same pixels of every image each update"),
    _m("factors-not-debiased", "curvature.py",
       "        if not self.debias or weight is None:\n",
       "        if True:\n",
       [f"{T_FACTORS}::test_debiased_factors_weigh_each_step_by_its_age"],
       "the first update's statistics (of the initial weights) keep weight ρ^n"),
    _m("folded-factors-not-debiased", "curvature.py",
       "keep = self.decay(block.name, rho)  # the same",
       "keep = rho  # the same",
       [f"{T_FACTORS}::test_debiased_factors_weigh_each_step_by_its_age"],
       "the micro-batch / sampled-backward fold path with the plain moving average"),
    _m("matrix-factors-not-debiased", "update.py",
       "if self.debias and (",
       "if False and (",
       [f"{T_RULES}::test_matrices_without_a_block_get_adam_in_their_gradient_eigenbasis"],
       "a blockless matrix's L and R averaged unlike the blocks' factors"),
    _m("sampled-backward-first-tap-only", "capture.py",
       "    return [edge for edge in unique\n",
       "    return unique[:1] or [edge for edge in unique\n",
       [f"{T_REAL}::test_bert_sequence_classification"],
       "the sampled backward aimed at the first block output only: blocks on other branches get no G"),
    _m("held-gradient-rows-never-reduced", "capture.py",
       "        if self.held_gradient_bytes is not None and self._held_bytes >= self.held_gradient_bytes:",
       "        if False:",
       [f"{T_LAYERS}::test_gradient_rows_are_reduced_as_the_backward_goes"],
       "every output-gradient row held until the micro-batch ends"),
    _m("folded-factors-not-renormalised", "curvature.py",
       "        if scale != 1.0:",
       "        if False:",
       [f"{T_LAYERS}::test_folded_micro_batches_weigh_what_they_hold"],
       "folded micro-batches never divided by their total weight (fewer than k, or a NaN one)"),
    _m("folded-micro-batch-not-masked", "curvature.py",
       "                masked = torch.where(folded.flags[-1], sums[block.name], 0.0)",
       "                masked = sums[block.name].clone()",
       [f"{T_LAYERS}::test_folded_micro_batches_weigh_what_they_hold"],
       "a micro-batch with non-finite statistics folded into the factors"),
    _m("decay-0-factor-not-put-back", "curvature.py",
       "                store[name] = self.set_aside[key]",
       "                pass",
       [f"{T_ROBUST}::test_folded_nonfinite_statistics_leave_the_factors_bit_for_bit"],
       "with factor_decay=0, a step whose folded statistics were all non-finite loses the factors"),
    _m("sampled-g-parts-held", "capture.py",
       "if self._fold_gradient_parts and (in_sampled_backward or self.statistics.held_bytes() >= HELD_SUM_BYTES):",
       "if self._fold_gradient_parts and self.statistics.held_bytes() >= HELD_SUM_BYTES:",
       [f"{T_LAYERS}::test_gradient_rows_are_reduced_as_the_backward_goes"],
       "a sampled backward's G sums held to its end (beside the factors) instead of folded as reduced"),
    _m("sampled-patches-transposed-positions", "layers/conv.py",
       "windows[row // (height * width), position // width, position % width]",
       "windows[row // (height * width), position % height, position // height]",
       [f"{T_LAYERS}::test_sampled_conv_patches_are_the_picked_im2col_rows"],
       "the sampled convolution patches read output positions column-major (im2col is row-major)"),
    _m("sampled-patches-offset-dropped", "layers/conv.py",
       "torch.arange(chosen.start, examples",
       "torch.arange(0, examples",
       [f"{T_LAYERS}::test_sampled_conv_patches_are_the_picked_im2col_rows"],
       "the sampled convolution patches always start at row 0: one offset of every stride only"),
    _m("refresh-period-from-the-rows-taken", "statistics.py",
       "        return block.sampled_activation_rows(xs[0], pick), seen[0]",
       "        rows = block.sampled_activation_rows(xs[0], pick)\n        return rows, rows.shape[0]",
       [f"{T_OPT}::test_auto_refresh_period_keeps_decompositions_a_budgeted_share_of_the_layers_work"],
       "inv_update_steps='auto' weighs the layers' work by the rows the factors take, not the rows computed"),
    _m("refresh-period-per-example", "layers/conv.py",
       "        chosen = pick(examples * height * width)\n        if chosen is None:\n            return self.activation_rows(inputs)",
       "        chosen = pick(examples)\n        if chosen is None:\n            return self.activation_rows(inputs)",
       [f"{T_OPT}::test_auto_refresh_period_counts_every_position_of_a_convolution"],
       "a convolution's layer work counted per example, not per output position"),
    _m("refresh-period-not-saved", "preconditioner.py",
       "            refresh_period=self.refresh_period,\n",
       "",
       [f"{T_OPT}::test_auto_refresh_period_travels_with_a_checkpoint"],
       "a resumed run re-derives (or lacks) the refresh period instead of keeping its own"),
    _m("sparse-refresh-ignored", "preconditioner.py",
       "if b.name in self.sparse_refresh else shared",
       "if False else shared",
       [f"{T_OPT}::test_auto_refresh_is_sparse_for_a_block_whose_decompositions_outweigh_its_layer"],
       "a block whose decompositions outweigh its layer is refreshed on the shared schedule"),
    _m("sparse-refresh-decomposes-every-factor", "inverse.py",
       "kept = [due is not None and not due[j]",
       "kept = [due is not None and not due[j] and False",
       [f"{T_OPT}::test_auto_refresh_is_sparse_for_a_block_whose_decompositions_outweigh_its_layer"],
       "a refresh step decomposes the factors not due as well"),
    _m("sparse-refresh-not-saved", "preconditioner.py",
       "            sparse_refresh=dict(self.sparse_refresh),\n",
       "",
       [f"{T_OPT}::test_auto_refresh_period_travels_with_a_checkpoint"],
       "a resumed run forgets which blocks it refreshes sparsely"),
    _m("refresh-budget-per-rank", "topology/collective.py",
       "return (self.all_sum(values.double().to(self.device)) / self.world_size).tolist()",
       "return values.tolist()",
       [f"{T_DIST}::test_auto_refresh_budget_is_the_mean_over_the_ranks"],
       "each rank budgets refreshes from its own rows: ranks with unequal batches refresh apart"),
    _m("broadcast-kept-records", "topology/collective.py",
       "if owner == src and factors[i].dim() == 2 and fresh[i]]",
       "if owner == src and factors[i].dim() == 2]",
       [f"{T_DIST}::test_broadcast_mode_sends_only_the_refreshed_eigenpairs"],
       "owners re-send the eigenpairs every rank kept at a step that refreshed only other factors"),
    _m("matrix-basis-on-sparse-refresh", "optimizer.py",
       "basis_due=precond.is_shared_inverse_step()",
       "basis_due=precond.is_inverse_step()",
       [f"{T_RULES}::test_a_blockless_matrix_refreshes_its_basis_on_the_blocks_shared_schedule"],
       "a blockless matrix's basis is also refreshed whenever a sparsely refreshed block is"),
]


def installed_package() -> Path:
    """The directory of the installed kfac_ext (not this checkout's sources)."""
    spec = importlib.util.find_spec("kfac_ext")
    if spec is None or spec.origin is None:
        sys.exit("mutation_check: kfac_ext is not installed in this Python "
                 f"({sys.executable}); build and install it from this checkout first")
    package = Path(spec.origin).resolve().parent
    if not list(package.glob("_C*.so")) and not list(package.glob("_C*.pyd")):
        sys.exit(f"mutation_check: {package} has no compiled _C: that is a source tree, not the installed package")
    return package


def stale_files(package: Path) -> list[str]:
    """The checkout's kfac_ext/*.py that differ from (or are missing in) the installed copy."""
    source = REPO / "kfac_ext"
    stale = []
    for path in sorted(source.rglob("*.py")):
        rel = path.relative_to(source)
        other = package / rel
        if not other.exists() or not filecmp.cmp(path, other, shallow=False):
            stale.append(str(rel))
    return stale


def check_snippets(package: Path, mutations: list[Mutation]) -> list[str]:
    """One problem per mutation whose snippet is not found exactly once (or changes nothing)."""
    problems = []
    for m in mutations:
        path = package / m.file
        if not path.exists():
            problems.append(f"{m.name}: file kfac_ext/{m.file} not found")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: snippet found {count} times in kfac_ext/{m.file} (needs exactly 1): {m.old!r}")
        elif m.old == m.new:
            problems.append(f"{m.name}: the new snippet equals the old one")
    return problems


def pytest_command() -> list[str]:
    """pytest of this Python, without the current directory on sys.path (the checkout's kfac_ext
    sources must not shadow the copy): ``-P`` (Python 3.11+), else the venv's pytest script."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "pytest"]
    script = Path(sys.executable).with_name("pytest")
    if not script.exists():
        sys.exit(f"mutation_check: needs Python 3.11+ or a pytest script next to {sys.executable}")
    return [str(script)]


def run_pytest(copy_root: Path, tests: list[str], timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("KFAC_GOLDEN", None)
    # One BLAS / OpenMP thread unless told otherwise: on a shared 2-core machine, spin-waiting
    # threads made a ResNet test take 80 s instead of 2 (the tests' tolerances do not depend on
    # the thread count).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    cmd = pytest_command() + ["-q", "-rfE", "-p", "no:cacheprovider", "--no-header", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\n[timed out after {timeout:.0f} s]", time.monotonic() - start
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def failed_tests(output: str) -> list[str]:
    return re.findall(r"^FAILED (\S+)", output, flags=re.M)


def summary_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="run only these mutations (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not run the tests on the unmutated copy first")
    parser.add_argument("--allow-stale", action="store_true",
                        help="run even if the installed kfac_ext differs from this checkout's")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    parser.add_argument("--show", action="store_true", help="print each run's failure messages (the E lines)")
    args = parser.parse_args()

    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "duplicate mutation names"
    unknown = [n for n in args.names if n not in names]
    if unknown:
        sys.exit(f"mutation_check: unknown mutations {unknown}; --list shows them")
    mutations = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in mutations:
            print(f"{m.name}  (kfac_ext/{m.file}): {m.why}")
            for t in m.tests:
                print(f"    {t}")
        return 0

    package = installed_package()
    print(f"installed kfac_ext: {package}")
    stale = stale_files(package)
    if stale:
        message = f"the installed kfac_ext differs from {REPO / 'kfac_ext'} in {stale}"
        if not args.allow_stale:
            sys.exit(f"mutation_check: {message}: reinstall it (or pass --allow-stale)")
        print(f"WARNING: {message}")
    problems = check_snippets(package, mutations)
    if problems:
        print("mutation_check: snippets to re-target (the code changed):", *problems, sep="\n  ")
        return 2

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kfac_mutation_") as tmp:
        root = Path(tmp)
        copy = root / "kfac_ext"
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))

        # 1. The copy shadows the installed package: a canary that raises on import must show.
        init = copy / "__init__.py"
        original_init = init.read_text()
        init.write_text(original_init + f"\nraise ImportError({CANARY!r})\n")
        try:
            code, output, seconds = run_pytest(root, [f"{T_FAST}::test_no_host_reads_catches_them"], args.timeout)
        finally:
            init.write_text(original_init)
        if code == 0 or CANARY not in output:
            print(output[-3000:])
            sys.exit("mutation_check: the temporary copy of kfac_ext does not shadow the installed package "
                     "(the canary's ImportError did not show); check PYTHONPATH handling")
        print(f"the copy shadows the installed package (canary seen, {seconds:.0f} s)")

        # 2. The unmutated copy passes every test the mutations use.
        if not args.skip_baseline:
            union = list(dict.fromkeys(t for m in mutations for t in m.tests))
            code, output, seconds = run_pytest(root, union, args.timeout)
            print(f"baseline, unmutated ({len(union)} test selections): {summary_line(output)} [{seconds:.0f} s]")
            if code != 0:
                print(output[-5000:])
                sys.exit("mutation_check: the tests fail without any mutation; fix that first")

        # 3. Each mutation, one at a time.
        results = []
        for i, m in enumerate(mutations, 1):
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                code, output, seconds = run_pytest(root, list(m.tests), args.timeout)
            finally:
                path.write_text(original)
            failed = failed_tests(output)
            caught = code == 1 and bool(failed)
            status = "caught" if caught else "NOT CAUGHT" if code == 0 else f"ERROR (pytest exit {code})"
            print(f"[{i}/{len(mutations)}] {m.name}: {status} [{seconds:.0f} s] -- {summary_line(output)}")
            for f in failed:
                print(f"      failed: {f}")
            if args.show:
                for line in dict.fromkeys(line for line in output.splitlines() if line.startswith("E ")):
                    print(f"      {line[:200]}")
            if not caught:
                print(output[-3000:])
            results.append((m, caught))

    missed = [m.name for m, caught in results if not caught]
    minutes = (time.monotonic() - started) / 60
    print(f"\n{len(results) - len(missed)} of {len(results)} mutations caught in {minutes:.1f} min")
    if missed:
        print("NOT caught (strengthen the tests):", ", ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
