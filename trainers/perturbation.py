"""Adaptive Layerwise Perturbation: learnable Gaussian noise on the residual stream of a decoder.

ALP (DESIGN.md, "The problem ALP solves") perturbs the *training* side of the importance ratio.
Every selected decoder layer l reads `h_l + sigma_l * eps` instead of `h_l`, where `h_l` is the
residual stream entering the layer (before its input norm), `eps ~ N(0, I)` is drawn per token and
per hidden unit, and `sigma_l = exp(s_l)` is one scalar per layer trained by the RL loss.

The noise is added by forward hooks on the model's own decoder layers, so any Hugging Face decoder
works unmodified, and only inside `with perturbation.active(seed=...)`: outside that block the hooks
return immediately and the model computes bit for bit what it computes without them. Each hook
reseeds a `torch.Generator` with (seed, layer) before drawing, so a recompute of the same forward
(gradient checkpointing) sees the same noise. `LayerPerturbation` is deliberately not an
`nn.Module`: it can never become part of the model's module tree, its `state_dict` or
`save_pretrained`.

Hidden-state scale differs by orders of magnitude between layers (the first layer reads the raw
embeddings; ../shared/notes/alp-at-tiny-scale.md), so an absolute sigma perturbs layers very
unequally. `calibrate` sets each sigma to a fraction of the RMS of that layer's measured input;
`calibrate_to` sets it to a multiple of the measured difference between the engine's copy of the
model and the model itself at that layer (the engine's own error there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from alp_agents.errors import ConfigError, ModelError

LayerSelection = Literal["all", "early", "middle", "late", "logits"] | list[int]
"""Which points get noise: every layer, a third of them, explicit indices, or only the final hidden state."""

THIRDS = ("early", "middle", "late")

CALIBRATION_FLOOR = 1e-8
"""`calibrate_to` floors a point's measured engine error at this fraction of the point's RMS, so sigma is never 0."""


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Hugging Face causal LM, found without knowing its class.

    Tries the decoder's `layers` attribute (Llama, Qwen2, Mistral, ...), then the only ModuleList
    whose length equals `config.num_hidden_layers` (GPT-2's `transformer.h`, ...). A PEFT wrapper
    (PeftModel, `trainer.lora`) is looked through: its base model's layers, adapters inside, are the ones.
    """
    get_base_model = getattr(model, "get_base_model", None)  # PeftModel's; a plain Hugging Face model has none
    if callable(get_base_model):
        model = get_base_model()
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(candidates) == 1:
        return candidates[0]
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__}: no `layers` ModuleList on its decoder and "
        f"{len(candidates)} ModuleLists of length config.num_hidden_layers={num_layers}; "
        "ALP needs a Hugging Face decoder-only causal LM"
    )


def select_layers(layers: LayerSelection, num_layers: int) -> list[int]:
    """Indices of the decoder layers a selection names; thirds split like `tensor_split(range(n), 3)`."""
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str) and layers in THIRDS:
        chosen = torch.arange(num_layers).tensor_split(3)[THIRDS.index(layers)].tolist()
        if not chosen:
            raise ConfigError(f"perturb_layers={layers!r}: a model with {num_layers} layers has no {layers} third")
        return chosen
    if isinstance(layers, list):
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ConfigError(
                f"perturb_layers={layers}: give distinct layer indices in [0, {num_layers - 1}] (the model has {num_layers} layers)"
            )
        return sorted(layers)
    raise ConfigError(f"perturb_layers={layers!r}: use 'all', 'early', 'middle', 'late', 'logits' or a list of layer indices")


class LayerPerturbation:
    """Learnable noise `sigma_l * eps` on the input of selected decoder layers, active only on demand.

    >>> perturbation = LayerPerturbation(model, layers="all", init_sigma=1e-2)    # doctest: +SKIP
    >>> with perturbation.active(seed=7):                                          # doctest: +SKIP
    ...     logits = model(input_ids).logits      # noisy; the same seed gives the same noise
    >>> perturbation.sigmas()                                                      # doctest: +SKIP

    `layers="logits"` (the ablation) perturbs only the final hidden state, i.e. the output of the last
    decoder layer, which the final norm and the LM head turn into the logits; nothing else in the
    network sees noise.
    """

    def __init__(self, model: nn.Module, *, layers: LayerSelection = "all", init_sigma: float = 1e-2) -> None:
        if not init_sigma >= 0:
            raise ConfigError(f"init_sigma={init_sigma}: the noise scale must be >= 0 (0 fixes sigma at exactly 0)")
        decoder_layers = find_decoder_layers(model)
        self.model = model
        """The model the hooks are attached to (held only to run `calibrate`)."""
        self.on_logits = layers == "logits"
        """True for the ablation that perturbs only the final hidden state."""
        self.layer_indices = [len(decoder_layers) - 1] if self.on_logits else select_layers(layers, len(decoder_layers))
        """Index of the decoder layer each point hooks (for `logits`: the last layer, on its output)."""
        self.names = ["logits"] if self.on_logits else [f"layer_{i}" for i in self.layer_indices]
        """One name per perturbed point, in the order of `log_sigma` (used in metric names)."""
        device = next(model.parameters()).device
        self.log_sigma = nn.Parameter(torch.full((len(self.names),), float(init_sigma), device=device).log())
        """s_l, one per point: sigma_l = exp(s_l). Float32, on the model's device, trained by the RL loss.
        init_sigma = 0 gives s_l = -inf: the noise is h + 0 * eps = h exactly, and the gradient of s_l is
        sigma_l * <grad, eps> = 0, so AdamW leaves it at -inf (sigma stays 0, nothing is learned)."""
        self._seed: int | None = None
        self._sigmas: tuple[Tensor, ...] = ()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._handles: list[RemovableHandle] = []
        for point, index in enumerate(self.layer_indices):
            layer = decoder_layers[index]
            if self.on_logits:
                self._handles.append(layer.register_forward_hook(self._output_hook(point)))
            else:
                self._handles.append(layer.register_forward_pre_hook(self._input_hook(point), with_kwargs=True))

    def sigmas(self) -> Tensor:
        """The current noise scales sigma_l = exp(s_l), one per point, detached."""
        return self.log_sigma.detach().exp()

    @contextmanager
    def active(self, *, seed: int) -> Iterator[None]:
        """Add noise to every forward run inside this block; `seed` (>= 0) fixes the noise.

        One block is meant for one forward pass and its backward: a second forward inside the same
        block draws the same noise again. Under gradient checkpointing, run the backward inside the
        block too, since the recompute runs the layers (and these hooks) again during backward.
        """
        if not self._handles:
            raise RuntimeError("this LayerPerturbation was removed; create a new one to perturb the model again")
        if self._seed is not None:
            raise RuntimeError("perturbation.active() blocks cannot be nested")
        if seed < 0:
            raise ValueError(f"seed={seed}: noise seeds must be non-negative")
        self._seed = seed
        self._sigmas = self.log_sigma.exp().unbind()  # one graph node per block; each hook reads its 0-d view
        try:
            yield
        finally:
            self._seed = None
            self._sigmas = ()

    @torch.no_grad()
    def calibrate(self, input_ids: Tensor, attention_mask: Tensor, *, relative_sigma: float) -> Tensor:
        """Set sigma_l = relative_sigma * RMS(h_l), measured on real tokens of this batch; return the RMS per point.

        RMS(h_l) is the root mean square over real tokens and hidden units of the hidden state the
        point perturbs (a layer's input, or the last layer's output for `logits`), without noise.
        """
        rms = torch.zeros(len(self.names), device=self.log_sigma.device)

        def measure(point: int, hidden: Tensor) -> None:
            rms[point] = _rms(hidden)

        self._visit_points(self.model, input_ids, attention_mask, measure)
        self.log_sigma.copy_((relative_sigma * rms).log())
        return rms

    @torch.no_grad()
    def calibrate_to(self, reference: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, scale: float) -> Tensor:
        """Set sigma_l = scale * RMS(h_l(reference) - h_l(model)) on real tokens of this batch; return that RMS per point.

        `reference` is the model as the inference engine serves it (e.g. fake-quantised or cast to
        bfloat16; any dtype and device: both sides are compared in float32), so sigma_l starts at the
        engine's own error at point l. A point where the two agree exactly (e.g. layer 0 when only
        matmul weights are quantised) would get sigma 0, log(sigma) = -inf for good: its difference
        is floored at CALIBRATION_FLOOR * RMS(h_l) for sigma (the returned value is the measured one).
        Holds this batch's hidden states at every point of the model at once (one forward's worth).
        """
        ours: list[Tensor] = [torch.empty(0)] * len(self.names)
        difference = torch.zeros(len(self.names), device=self.log_sigma.device)
        floor = torch.zeros(len(self.names), device=self.log_sigma.device)

        def keep(point: int, hidden: Tensor) -> None:
            ours[point] = hidden
            floor[point] = CALIBRATION_FLOOR * _rms(hidden)

        def compare(point: int, hidden: Tensor) -> None:
            difference[point] = _rms(hidden.to(ours[point].device) - ours[point])
            ours[point] = torch.empty(0)  # free it as soon as it is used

        self._visit_points(self.model, input_ids, attention_mask, keep)
        self._visit_points(reference, input_ids, attention_mask, compare)
        self.log_sigma.copy_((scale * torch.maximum(difference, floor)).log())
        return difference

    def _visit_points(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, visit: Callable[[int, Tensor], None]) -> None:
        """One noise-free forward of `model` calling `visit(point, hidden)` at each of this perturbation's points.

        `hidden` holds the real tokens only, in float32, (tokens, H). `model` is this perturbation's
        model or a copy of it (same architecture, so the same layer indices), on any device.
        """
        device = next(model.parameters()).device
        real = attention_mask.bool().to(device)

        def on_input(point: int) -> Any:  # pre-hook of a decoder layer
            return lambda module, args, kwargs: visit(point, _hidden_states(module, args, kwargs)[real].float())

        def on_output(point: int) -> Any:  # forward hook of the last decoder layer (`logits`)
            return lambda module, args, output: visit(point, _first_tensor(output)[real].float())

        layers = find_decoder_layers(model)
        handles = [
            layers[index].register_forward_hook(on_output(point))
            if self.on_logits
            else layers[index].register_forward_pre_hook(on_input(point), with_kwargs=True)
            for point, index in enumerate(self.layer_indices)
        ]
        try:
            model.get_decoder()(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()

    def remove(self) -> None:
        """Detach the hooks; the model is then exactly as it was before this object existed."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the hooks -------------------------------------------------------------------------------

    def _noisy(self, point: int, hidden: Tensor) -> Tensor:
        assert self._seed is not None
        generator = self._generators.get(hidden.device)
        if generator is None:
            generator = self._generators[hidden.device] = torch.Generator(device=hidden.device)
        generator.manual_seed((self._seed * len(self.names) + point) % 2**63)
        # float32 noise whatever the hidden state's dtype: under autocast the residual stream is float32 anyway; under
        # FSDP2's bfloat16 weights it is bfloat16, and h + sigma * eps is then rounded once, not eps and sigma first.
        eps = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=torch.float32)  # (B, T, H)
        return _AddScaledNoise.apply(hidden, self._sigmas[point], eps)

    def _input_hook(self, point: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if self._seed is None:
                return None
            if args:
                return (self._noisy(point, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._noisy(point, _hidden_states(module, args, kwargs))}

        return hook

    def _output_hook(self, point: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self._seed is None:
                return None
            if isinstance(output, tuple):
                return (self._noisy(point, output[0]), *output[1:])
            return self._noisy(point, output)

        return hook


class _AddScaledNoise(torch.autograd.Function):
    """h + sigma * eps, whose backward gives d/dsigma = <grad, eps> as one dot product.

    The same as the autograd of the plain expression with fewer kernels and no full-size temporary:
    on a small model these element-wise passes, not the matrix products, are what ALP adds to a step.
    sigma and eps are float32 (float64 in gradcheck); the sum is computed in the wider of h's and eps's dtype
    and returned in h's, so a bf16 residual stream is rounded once.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
        ctx.save_for_backward(eps)
        wide = torch.promote_types(hidden.dtype, eps.dtype)
        return torch.addcmul(hidden.to(wide), eps, sigma.to(wide)).to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (eps,) = ctx.saved_tensors
        wide = torch.promote_types(grad.dtype, eps.dtype)
        grad_sigma = torch.dot(grad.reshape(-1).to(wide), eps.reshape(-1).to(wide))  # float32 sum, even for a bf16 stream
        return grad, grad_sigma, None


def _hidden_states(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The residual stream a decoder layer was called with (first positional argument or `hidden_states=`)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ModelError(f"{type(module).__name__} was called without hidden states as its first argument or `hidden_states=`")


def _rms(values: Tensor) -> Tensor:
    """Root mean square of every element (0-d)."""
    return values.pow(2).mean().sqrt()


def _first_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output
