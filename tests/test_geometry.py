"Edge cases of `icrt.geometry` that do not read well as notebook cells: bad inputs, broadcasting, devices, gradients."
import numpy as np, pytest, torch
from scipy.spatial.transform import Rotation
from icrt.geometry import (euler_to_matrix, matrix_to_euler, quat_to_matrix, matrix_to_quat, matrix_to_rot6d,
                           rot6d_to_matrix, pose_to_pos_rot6d, pos_rot6d_to_pose, absolute_to_delta, delta_to_absolute,
                           chunk_actions)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

def rand_p9(shape, seed):
    "Random xyz + 6-D poses of shape (*shape, 9), float64 numpy."
    n = int(np.prod(shape))
    R = Rotation.random(n, random_state=seed).as_matrix()
    xyz = np.random.default_rng(seed).uniform(-1, 1, (n, 3))
    return np.concatenate([xyz, matrix_to_rot6d(R)], -1).reshape(*shape, 9)

@pytest.mark.parametrize("fn,x,msg", [
    (euler_to_matrix, np.zeros((4, 4)), "euler_to_matrix: `e` must have trailing shape (3,)"),
    (matrix_to_euler, np.zeros((4, 3)), "matrix_to_euler: `R` must have trailing shape (3, 3)"),
    (matrix_to_euler, np.zeros(3), "trailing shape (3, 3)"),
    (quat_to_matrix, np.zeros((2, 3)), "`q` must have trailing shape (4,)"),
    (matrix_to_quat, np.zeros((3, 4)), "trailing shape (3, 3)"),
    (matrix_to_rot6d, torch.zeros(2, 2, 3), "trailing shape (3, 3)"),
    (rot6d_to_matrix, np.zeros((2, 9)), "`r6` must have trailing shape (6,)"),
    (pose_to_pos_rot6d, np.zeros((2, 9)), "6 wide (xyz + euler) or 7 wide"),
    (pose_to_pos_rot6d, np.zeros(()), "6 wide"),
    (pos_rot6d_to_pose, np.zeros((2, 10)), "`p9` must have trailing shape (9,)"),
])
def test_bad_shapes_raise_one_line_errors(fn, x, msg):
    with pytest.raises(ValueError) as e: fn(x)
    assert msg in str(e.value) and "\n" not in str(e.value)

def test_bad_arguments():
    with pytest.raises(ValueError, match="order must be 'wxyz' or 'xyzw'"): quat_to_matrix(np.eye(4)[0], order="WXYZ")
    with pytest.raises(ValueError, match="order must be"): matrix_to_quat(np.eye(3), order="zyxw")
    with pytest.raises(ValueError, match="k must be >= 1"): chunk_actions(np.zeros((5, 2)), 0)
    with pytest.raises(ValueError, match=r"must be \(T, D\)"): chunk_actions(np.zeros(5), 2)
    with pytest.raises(TypeError, match="same kind"): delta_to_absolute(torch.zeros(9), np.zeros(9))
    with pytest.raises(ValueError, match="`target`"): absolute_to_delta(np.zeros(9), np.zeros(10))

def test_lists_and_integers_are_accepted():
    assert np.allclose(euler_to_matrix([0, 0, 0]), np.eye(3))
    assert euler_to_matrix(torch.tensor([0, 0, 0])).dtype == torch.get_default_dtype()
    assert np.allclose(quat_to_matrix([2, 0, 0, 0]), np.eye(3))
    assert chunk_actions([[1, 2], [3, 4]], 3).tolist() == [[[1, 2], [3, 4], [3, 4]], [[3, 4], [3, 4], [3, 4]]]

@pytest.mark.parametrize("seed", range(3))
def test_chunked_delta_broadcasting_matches_per_step_loop(seed):
    T, K = 7, 4
    cur, tgt = rand_p9((T,), seed), rand_p9((T, K), seed + 10)
    d = absolute_to_delta(cur[:, None], tgt)                               # (T, K, 9)
    assert d.shape == (T, K, 9)
    for t in range(T):                                                     # reference: one step at a time, via scipy
        Rc = Rotation.from_matrix(rot6d_to_matrix(cur[t, 3:]))
        for k in range(K):
            assert np.allclose(d[t, k, :3], Rc.inv().apply(tgt[t, k, :3] - cur[t, :3]), atol=1e-9)
            Rt = Rotation.from_matrix(rot6d_to_matrix(tgt[t, k, 3:]))
            assert np.allclose(rot6d_to_matrix(d[t, k, 3:]), (Rc.inv() * Rt).as_matrix(), atol=1e-9)
    assert np.allclose(delta_to_absolute(cur[:, None], d), tgt, atol=1e-9)

@pytest.mark.parametrize("device", DEVICES)
def test_torch_device_dtype_and_float32_accuracy(device):
    p64 = torch.from_numpy(rand_p9((3, 5), 0)).to(device)
    p32 = p64.float()
    outs = {"pose": pos_rot6d_to_pose(p32), "delta": absolute_to_delta(p32[:, :1], p32),
            "quat": matrix_to_quat(rot6d_to_matrix(p32[..., 3:]), order="xyzw"),
            "back": pose_to_pos_rot6d(pos_rot6d_to_pose(p32)), "chunk": chunk_actions(p32, 16)}
    for name, o in outs.items():
        assert o.dtype == torch.float32 and o.device.type == device, name
    assert outs["chunk"].shape == (3, 5, 16, 9)
    assert torch.allclose(outs["pose"].double(), pos_rot6d_to_pose(p64), atol=1e-5)
    assert torch.allclose(outs["back"], p32, atol=1e-5)

def test_gradients_finite_at_singular_rotations():
    "Gimbal lock, identity and 180-degree turns are where naive formulas produce NaN gradients."
    R = torch.from_numpy(np.stack([euler_to_matrix([0.3, np.pi/2, 0.5]), euler_to_matrix([0.3, -np.pi/2, 0.5]), np.eye(3),
                                   *Rotation.from_rotvec(np.pi * np.eye(3)).as_matrix()])).requires_grad_()
    (matrix_to_euler(R).sum() + matrix_to_quat(R).sum()).backward()
    assert torch.isfinite(R.grad).all()
    r6 = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)       # degenerate input: finite, not NaN
    rot6d_to_matrix(r6).sum().backward()
    assert torch.isfinite(r6.grad).all()

def test_gradcheck_conversions():
    M = torch.from_numpy(Rotation.random(6, random_state=3).as_matrix()).requires_grad_()
    for fn in [matrix_to_euler, matrix_to_quat]:
        assert torch.autograd.gradcheck(fn, (M,))
    for fn, n in [(euler_to_matrix, 3), (quat_to_matrix, 4), (pose_to_pos_rot6d, 7)]:
        assert torch.autograd.gradcheck(fn, (torch.randn(6, n, dtype=torch.float64, requires_grad=True),))

@pytest.mark.parametrize("seed", range(5))
def test_random_round_trips_many_shapes(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 4, size=rng.integers(0, 4)))             # 0 to 3 leading dims
    rots = Rotation.random(int(np.prod(shape)), random_state=seed)
    R = rots.as_matrix().reshape(*shape, 3, 3)
    assert euler_to_matrix(matrix_to_euler(R)).shape == R.shape
    assert np.allclose(euler_to_matrix(matrix_to_euler(R)), R, atol=1e-12)
    assert np.allclose(quat_to_matrix(matrix_to_quat(R)), R, atol=1e-12)
    assert np.allclose(rot6d_to_matrix(matrix_to_rot6d(R)), R, atol=1e-12)
    assert np.allclose(matrix_to_euler(R), rots.as_euler("xyz").reshape(*shape, 3), atol=1e-9)

def test_quaternion_orders_agree_and_canonical_sign():
    q_xyzw = Rotation.random(50, random_state=4).as_quat()
    q_wxyz = q_xyzw[:, [3, 0, 1, 2]]
    assert np.allclose(quat_to_matrix(q_wxyz), quat_to_matrix(q_xyzw, order="xyzw"))
    assert np.allclose(quat_to_matrix(-q_wxyz), quat_to_matrix(q_wxyz))
    out = matrix_to_quat(quat_to_matrix(q_wxyz))
    assert (out[:, 0] >= 0).all() and np.allclose(np.linalg.norm(out, axis=-1), 1)
    assert np.allclose(matrix_to_quat(quat_to_matrix(q_wxyz), order="xyzw"), out[:, [1, 2, 3, 0]])

def test_matrix_to_quat_accurate_for_half_turns():
    "180-degree turns (w = 0) defeat the trace-only formula; Shepperd's row choice must handle them."
    axes = np.random.default_rng(5).normal(size=(200, 3))
    rots = Rotation.from_rotvec(np.pi * axes / np.linalg.norm(axes, axis=1, keepdims=True))
    q = matrix_to_quat(torch.from_numpy(rots.as_matrix()), order="xyzw").numpy()
    assert np.allclose(np.abs(np.sum(q * rots.as_quat(), axis=-1)), 1, atol=1e-12)
