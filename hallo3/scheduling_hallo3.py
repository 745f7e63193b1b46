"""The official Hallo3 sampler as a diffusers scheduler (architecture 6.4, 6.5, 7.4, 12.11, 12.12)."""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class Hallo3SchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def rescaled_alphas_cumprod_sqrt(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> torch.Tensor:
    """sqrt(alpha_bar) at `timesteps` (ascending), rescaled to zero terminal SNR over that subset.

    Computed in fp32 with the ratio first, as the official `ZeroSNRDDPMDiscretization` does (architecture 15.2).
    """
    a = torch.tensor(alphas_cumprod[timesteps], dtype=torch.float32).sqrt()
    a_first, a_last = a[0].clone(), a[-1].clone()
    return (a - a_last) * (a_first / (a_first - a_last))


class Hallo3DPMScheduler(SchedulerMixin, ConfigMixin):
    """DPM-Solver++(2M) SDE in VP form with v-prediction on a zero-terminal-SNR schedule, exactly as Hallo3 samples.

    Implements `VPSDEDPMPP2MSampler` + `ZeroSNRDDPMDiscretization` + `DiscreteDenoiser` of the official code (SAT sgm).
    diffusers' `CogVideoXDPMScheduler` is the same algorithm but not the same numbers (architecture 7.4): it rescales
    alpha_bar over all 1000 steps (anchor t=0) instead of over the selected steps (anchor t=19 for 50 steps), it
    does not snap alpha to the nearest training-table entry for the x0 estimate, and its step list differs when the
    step count does not divide 1000. This class reproduces the official values, including:

    - the network is given the selected (unsnapped) timestep, while c_skip/c_out use the nearest entry of the
      1000-step table;
    - two noise draws per step after the first, the first of which is discarded (this only matters for RNG-exact
      reproduction, but it is what the official code does);
    - the last step returns the x0 estimate without noise.

    `step_denoised` takes the guided x0 estimate, as the official sampler guides x0 (architecture 7.3); `step` takes a
    v-prediction. The two guidances are equal algebraically (both rows share c_skip/c_out), not in floating point.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        snr_shift_scale: float = 1.0,
        prediction_type: str = "v_prediction",
    ):
        if prediction_type != "v_prediction":
            raise ValueError(f"Hallo3 predicts v; `prediction_type` must be 'v_prediction', got {prediction_type!r}.")
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod = alphas_cumprod / (snr_shift_scale + (1 - snr_shift_scale) * alphas_cumprod)
        # the denoiser's table, index = timestep: rescaled over all timesteps (anchors t=0 and t=999)
        self.train_alphas_cumprod_sqrt = rescaled_alphas_cumprod_sqrt(
            self.alphas_cumprod, np.arange(num_train_timesteps)
        )
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.alphas_cumprod_sqrt: torch.Tensor | None = None
        self._step_index: int | None = None
        self._previous_denoised: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Select `num_inference_steps` timesteps, high noise first, and their rescaled alphas (plus a final 1)."""
        if not 1 <= num_inference_steps <= self.config.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` must be in 1..{self.config.num_train_timesteps}, got {num_inference_steps}."
            )
        n = self.config.num_train_timesteps
        ascending = np.linspace(n - 1, 0, num_inference_steps, endpoint=False).astype(int)[::-1].copy()
        alphas = rescaled_alphas_cumprod_sqrt(self.alphas_cumprod, ascending).flip(0)
        self.alphas_cumprod_sqrt = torch.cat([alphas, alphas.new_ones(1)])  # a_N = 1: the clean sample
        self.timesteps = torch.from_numpy(ascending[::-1].copy()).to(device)
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        self._previous_denoised = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def denoiser_alpha(self, step_index: int) -> float:
        """The 1000-table alpha nearest to the schedule's alpha at `step_index` (official `possibly_quantize_sigma`)."""
        if self.alphas_cumprod_sqrt is None:
            raise ValueError("Call `set_timesteps` before sampling.")
        table = self.train_alphas_cumprod_sqrt
        nearest = torch.argmin((table - self.alphas_cumprod_sqrt[step_index]).abs())
        return table[nearest].item()

    def predict_original_sample(
        self, model_output: torch.Tensor, sample: torch.Tensor, step_index: int | None = None
    ) -> torch.Tensor:
        """x0 = c_skip * x_t + c_out * v with c_skip = a, c_out = -sqrt(1 - a^2), a snapped to the training table."""
        step_index = self._step_index if step_index is None else step_index
        if step_index is None:
            raise ValueError("Call `set_timesteps` before sampling.")
        # c_skip and c_out as fp32 tensors, computed as the official denoiser computes them (a double-precision
        # sqrt rounded to fp32 can differ from fp32 arithmetic by one ulp, which the sampler then amplifies)
        alpha = torch.tensor(self.denoiser_alpha(step_index), dtype=torch.float32, device=sample.device)
        c_out = -((1 - alpha**2) ** 0.5)
        return model_output.to(sample.dtype) * c_out + sample * alpha

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample  # c_in = 1 for the VP parameterisation

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = a x0 + sqrt(1 - a^2) eps with a from the training table (used by training)."""
        a = self.train_alphas_cumprod_sqrt.to(original_samples.device)[timesteps.long()]
        a = a.view(-1, *([1] * (original_samples.ndim - 1))).to(original_samples.dtype)
        return a * original_samples + (1 - a**2).sqrt() * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v target: v = a eps - sqrt(1 - a^2) x0 (training table)."""
        a = self.train_alphas_cumprod_sqrt.to(sample.device)[timesteps.long()]
        a = a.view(-1, *([1] * (sample.ndim - 1))).to(sample.dtype)
        return a * noise - (1 - a**2).sqrt() * sample

    @staticmethod
    def _log_snr(alpha: torch.Tensor) -> torch.Tensor:
        """lambda = log(a / sqrt(1 - a^2)), -inf at a = 0, computed as the official sampler does."""
        alpha_cumprod = alpha**2
        return ((alpha_cumprod / (1 - alpha_cumprod)) ** 0.5).log()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Hallo3SchedulerOutput | tuple:
        """One DPM-Solver++(2M) SDE step from a v-prediction; the last step returns x0. (Hallo3's pipeline guides
        on x0, as the official sampler does, and calls `step_denoised`.)"""
        if self._step_index is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        denoised = self.predict_original_sample(model_output, sample, self._step_index)
        return self.step_denoised(denoised, timestep, sample, generator, return_dict)

    def step_denoised(
        self,
        denoised: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Hallo3SchedulerOutput | tuple:
        """One DPM-Solver++(2M) SDE step from the (guided) x0 estimate `denoised`; the last step returns it."""
        if self._step_index is None or self.alphas_cumprod_sqrt is None or self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        i = self._step_index
        if i == self.num_inference_steps - 1:
            self._step_index += 1
            prev_sample = denoised
        else:
            # fp32 tensor arithmetic in the official order (architecture 7.4): the same values as in double precision
            # up to rounding, and the rounding is what a parity check sees
            alphas = self.alphas_cumprod_sqrt.to(sample.device)
            alpha, alpha_next = alphas[i], alphas[i + 1]
            h = self._log_snr(alpha_next) - self._log_snr(alpha)
            mult1 = ((1 - alpha_next**2) / (1 - alpha**2)) ** 0.5 * (-h).exp()
            mult2 = (-2 * h).expm1() * alpha_next
            noise_scale = (1 - alpha_next**2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5

            # The official sampler always computes the first-order update first, so its noise is drawn (and, after
            # the first step, thrown away) before the second-order update draws its own.
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = mult1 * sample - mult2 * denoised + noise_scale * noise
            if self._previous_denoised is not None and i > 0 and torch.isfinite(h):
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
                r = (self._log_snr(alpha) - self._log_snr(alphas[i - 1])) / h  # inf after the first step: D' = D
                combined = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self._previous_denoised
                prev_sample = mult1 * sample - mult2 * combined + noise_scale * noise
            self._previous_denoised = denoised
            self._step_index += 1

        if not return_dict:
            return prev_sample, denoised
        return Hallo3SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
