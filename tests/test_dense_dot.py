"""layers.dense_dot: the projection every Linear and DenseND runs. Its values and gradients equal
a plain dot_general's (the oracle), and on XLA:CPU the kernel's gradient compiles without the
transposed copies that a two-axis contraction brought (the reason it merges the leading axes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fitv2_jax.models.layers import dense_dot


def _reference(x, kernel, n_in):
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


@pytest.mark.parametrize(
    "x_shape, k_shape, n_in",
    [((4, 10, 16), (16, 24), 1), ((4, 10, 3, 8), (3, 8, 16), 2), ((16,), (16, 3, 2, 4), 1)],
)
def test_dense_dot_equals_dot_general_with_gradients(x_shape, k_shape, n_in):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
    out, vjp = jax.vjp(lambda a, b: dense_dot(a, b, n_in), x, kernel)
    ref, ref_vjp = jax.vjp(lambda a, b: _reference(a, b, n_in), x, kernel)
    assert out.shape == ref.shape == x_shape[: len(x_shape) - n_in] + k_shape[n_in:]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-5)
    d_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    for got, want in zip(vjp(d_out), ref_vjp(d_out), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_kernel_gradient_has_no_transposed_copies_on_cpu():
    """(B, N, D) x (D, F): the gradient's compiled HLO holds no (D, B*N) or (F, B*N) array."""
    b, n, d, f = 4, 32, 16, 24
    x = jnp.ones((b, n, d))
    g = jnp.ones((b, n, f))

    def kernel_grad(x, g):
        _, vjp = jax.vjp(lambda k: jnp.tanh(dense_dot(x, k, 1)), jnp.ones((d, f)))
        return vjp(jnp.cos(g))[0]  # elementwise producers, as in the backward pass

    hlo = jax.jit(kernel_grad).lower(x, g).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    for transposed in (f"f32[{d},{b * n}]", f"f32[{f},{b * n}]"):
        assert transposed not in entry, f"transposed copy {transposed} in:\n{entry}"
