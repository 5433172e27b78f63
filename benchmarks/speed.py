"""Measures what docs/ reports as speed: environment steps/s, SAC updates/s (collect_data.py), TD3+BC
updates/s (td3_bc.py) and the bound its matrix products alone set, and C-LAP's world-model and actor-critic
steps/s (c_lap.py), on random data, with the networks and losses of the scripts themselves.

    python benchmarks/speed.py --threads 2
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# transparent huge pages, as c_lap.py and lawm.py set them: PyTorch reads the switch at its first allocation of
# 2 MB or more, which here comes before c_lap.py is imported
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import collect_data  # noqa: E402
import td3_bc  # noqa: E402


def rate(fn, seconds: float) -> float:
    """Calls fn() repeatedly for about `seconds` after a warm-up; returns calls per second."""
    for _ in range(10):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def env_steps(name: str, seconds: float) -> float:
    """Agent steps/s (action repeat 2) of `rollout` with uniform random actions."""
    env = collect_data.make_env(name, 0)
    act_dim = env.action_spec().shape[0]
    rng = np.random.default_rng(0)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        steps += len(collect_data.rollout(env, lambda o: rng.uniform(-1, 1, act_dim), 500, 2)[1])
    return steps / (time.perf_counter() - start)


def sac_updates(seconds: float) -> float:
    args = collect_data.Args()
    agent = collect_data.SAC(17, 6, args, torch.device("cpu"))
    n = 100_000
    replay = [torch.randn(n, 17), torch.rand(n, 6) * 2 - 1, torch.randn(n), torch.randn(n, 17), torch.zeros(n)]

    def step():
        idx = torch.randint(0, n, (args.batch_size,))
        agent.update([x[idx] for x in replay], args)

    return rate(step, seconds)


def td3_bc_updates(seconds: float) -> float:
    """The update of td3_bc.py's training loop (critic every step, actor and targets every policy_freq)."""
    args = td3_bc.Args()
    actor, actor_target = td3_bc.Actor(17, 6, args.hidden_dim), td3_bc.Actor(17, 6, args.hidden_dim)
    critic, critic_target = td3_bc.TwinCritic(17, 6, args.hidden_dim), td3_bc.TwinCritic(17, 6, args.hidden_dim)
    actor_target.requires_grad_(False)
    critic_target.requires_grad_(False)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=True)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, fused=True)
    target_params = list(critic_target.parameters()) + list(actor_target.parameters())
    online_params = list(critic.parameters()) + list(actor.parameters())
    n = 100_000
    data = [torch.randn(n, 17), torch.rand(n, 6) * 2 - 1, torch.randn(n), torch.randn(n, 17), torch.zeros(n)]
    counter = [0]

    def step():
        idx = torch.randint(0, n, (args.batch_size,))
        batch = [x[idx] for x in data]
        loss_q = td3_bc.critic_loss(critic, critic_target, actor_target, batch, args)
        critic_optimizer.zero_grad(set_to_none=True)
        loss_q.backward()
        critic_optimizer.step()
        if counter[0] % args.policy_freq == 0:
            critic.requires_grad_(False)
            loss_pi, _ = td3_bc.actor_loss(actor, critic, batch, args.alpha)
            actor_optimizer.zero_grad(set_to_none=True)
            loss_pi.backward()
            actor_optimizer.step()
            critic.requires_grad_(True)
            with torch.no_grad():
                torch._foreach_lerp_(target_params, online_params, args.tau)
        counter[0] += 1

    return rate(step, seconds)


def td3_bc_matmul_floor(seconds: float, obs: int = 17, act: int = 6, hidden: int = 256, batch: int = 256) -> float:
    """Updates/s if one TD3+BC update were nothing but its matrix products: the same shapes, forward and
    backward, on random tensors (critic step every update, actor step every second). An upper bound on
    `td3_bc_updates`: no elementwise work, optimizer, sampling or autograd bookkeeping."""
    B, H, i = batch, hidden, obs + act
    r = torch.randn

    def mm(m, k, n, twin=False):
        a, b = (r(2, m, k), r(2, k, n)) if twin else (r(m, k), r(k, n))
        return lambda: torch.bmm(a, b) if twin else torch.mm(a, b)

    actor_fwd = [mm(B, obs, H), mm(B, H, H), mm(B, H, act)]
    critic_fwd = [mm(B, i, H, True), mm(B, H, H, True), mm(B, H, 1, True)]
    # backward of a layer y = x W: dx = dy W^T (B, out) x (out, in), dW = x^T dy (in, B) x (B, out)
    critic_bwd = [mm(B, 1, H, True), mm(H, B, 1, True), mm(B, H, H, True), mm(H, B, H, True), mm(i, B, H, True)]
    q1_fwd = [mm(B, i, H), mm(B, H, H), mm(B, H, 1)]
    q1_bwd_inputs = [mm(B, 1, H), mm(B, H, H), mm(B, H, i)]
    actor_bwd = [mm(B, act, H), mm(H, B, act), mm(B, H, H), mm(H, B, H), mm(obs, B, H)]
    critic_step = actor_fwd + critic_fwd + critic_fwd + critic_bwd  # target actor and critic, critic, backward
    actor_step = actor_fwd + q1_fwd + q1_bwd_inputs + actor_bwd
    two_updates = critic_step + critic_step + actor_step

    def step():
        for f in two_updates:
            f()

    return 2 * rate(step, seconds)


def c_lap_steps(seconds: float, deter: int = 200, stoch: int = 30, hidden: int = 200):
    """World-model gradient steps/s at batch 50 x 50, and actor-critic steps/s from 2550 imagined starts
    (horizon 15, 5 value nets), with the sizes of SPEC §7's naive figures. The actor-critic step is the one of
    c_lap.py's loop: λ-returns from the slow target ensemble, through which the actor's gradient flows."""
    import c_lap

    args = c_lap.Args(deter_dim=deter, stoch_dim=stoch, hidden_dim=hidden)
    wm = c_lap.WorldModel(17, 6, args)
    opt = torch.optim.Adam(wm.parameters(), lr=args.model_learning_rate)
    obs, act, rew = torch.randn(50, 51, 17), torch.rand(50, 50, 6) * 2 - 1, torch.randn(50, 50)

    def model_step():
        loss, _, _ = c_lap.elbo_loss(wm, obs, act, rew, args, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model = rate(model_step, seconds)
    wm.requires_grad_(False)
    feat_dim = deter + stoch
    actor = c_lap.LatentActor(feat_dim, args.latent_action_dim, hidden, args.mlp_layers)
    values = c_lap.ValueEnsemble(args.num_values, feat_dim, hidden)
    values_target = c_lap.ValueEnsemble(args.num_values, feat_dim, hidden)
    values_target.load_state_dict(values.state_dict())
    values_target.requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_learning_rate)
    value_opt = torch.optim.Adam(values.parameters(), lr=args.value_learning_rate)

    def agent_step():
        with torch.no_grad():
            feat = wm.observe(wm.encoder(obs), act)["feat"].reshape(-1, feat_dim)
        feats, log_probs = c_lap.imagine(wm, actor, feat[:, :deter], feat[:, deter:], args.horizon, args.epsilon)
        rewards = wm.reward_decoder(feats[1:]).squeeze(-1)
        returns = c_lap.lambda_return(rewards, values_target(feats).mean(0), args.gamma, args.return_lambda)
        actor_opt.zero_grad(set_to_none=True)
        (-returns.mean() + args.entropy_coef * log_probs.mean()).backward()
        torch.nn.utils.clip_grad_norm_(actor.parameters(), args.grad_clip)
        actor_opt.step()
        value_loss = ((values(feats[:-1].detach()) - returns.detach()) ** 2).mean(dim=(1, 2)).sum()
        value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        torch.nn.utils.clip_grad_norm_(values.parameters(), args.grad_clip)
        value_opt.step()

    return model, rate(agent_step, seconds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per figure")
    parser.add_argument("--envs", nargs="*", default=["cheetah-run", "walker-walk", "hopper-stand"])
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads")
    for name in a.envs:
        print(f"{name}: {env_steps(name, a.seconds):7.0f} agent steps/s (random actions, action repeat 2)")
    print(f"SAC (collect_data.py, batch 256, 256x2):  {sac_updates(a.seconds):6.1f} updates/s")
    print(f"TD3+BC (td3_bc.py, batch 256, 256x2):     {td3_bc_updates(a.seconds):6.1f} updates/s")
    print(f"TD3+BC, its matrix products alone:       {td3_bc_matmul_floor(a.seconds):6.1f} updates/s (upper bound)")
    model, agent = c_lap_steps(a.seconds)
    print(f"C-LAP world model (batch 50x50, deter 200, stoch 30, hidden 200): {model:5.2f} steps/s")
    print(f"C-LAP actor-critic (2550 starts, horizon 15, 5 values):          {agent:5.2f} steps/s")
