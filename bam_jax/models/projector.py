"""The MLP projector head (official ``models/heads.py``), flax.nnx."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Projector(nnx.Module):
    """MLP head of the official ``MlpProjHead``.

    n_layers Linear layers (all with the same ``bias`` flag), each hidden layer
    followed by [BatchNorm] + activation; the last Linear is followed by a
    non-affine BatchNorm only when ``use_bn and last_bn``. Linear weights
    ~ N(0, 0.02) (torch trunc_normal_ with std .02 truncates at +-2 absolute,
    i.e. effectively never), biases 0. BatchNorm momentum/eps follow torch.
    """

    def __init__(self, in_dim: int, *, n_layers: int = 3, hidden_dim: int = 4096, out_dim: int = 4096,
                 act: str = 'gelu', use_bn: bool = True, last_bn: bool = True, bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if n_layers < 1:
            raise ValueError('projector needs at least one layer')
        if act not in ('gelu', 'relu'):
            raise ValueError(f'unknown projector activation {act!r}')
        self.act = act
        self.out_dim = out_dim
        linears, norms = [], []
        for i in range(n_layers):
            d_in = in_dim if i == 0 else hidden_dim
            d_out = out_dim if i == n_layers - 1 else hidden_dim
            linears.append(nnx.Linear(d_in, d_out, use_bias=bias, kernel_init=nnx.initializers.normal(0.02),
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            is_last = i == n_layers - 1
            if use_bn and (not is_last or last_bn):
                norms.append(nnx.BatchNorm(d_out, momentum=0.9, epsilon=1e-5, use_bias=not is_last,
                                           use_scale=not is_last, dtype=dtype, param_dtype=param_dtype,
                                           rngs=rngs))
            else:
                norms.append(None)
        self.linears = nnx.List(linears)
        self.norms = nnx.List(norms)

    def __call__(self, x, *, deterministic: bool = True) -> jax.Array:
        """[N, in_dim] -> [N, out_dim] (float32). BatchNorm statistics are over all N rows."""
        n = len(self.linears)
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            x = linear(x)
            if norm is not None:
                x = norm(x, use_running_average=deterministic)
            if i < n - 1:
                x = jax.nn.gelu(x, approximate=False) if self.act == 'gelu' else jax.nn.relu(x)
        return x.astype(jnp.float32)
