"""Does an `icl` policy recall a training scene's goal instead of reading its prompt? (exploratory, issue #25)

    OMP_NUM_THREADS=1 MUJOCO_GL=osmesa python tools/icl_scene_recall.py BENCH_OUT [N]

BENCH_OUT is an `icrt_bench_metaworld --suite icl` output folder (its data/ and train/run/). For the first N (default 8)
training goals of each verb it restores the exact initial state of that goal's first training demonstration and rolls
the policy out twice for 120 steps (the cpu preset's budget): prompted with a fresh demonstration of the scene's own
goal, and with one of another training goal at least 10 cm away. A policy that recalls the scene ends near the scene's
goal; one that reads its prompt ends near the prompted goal. Prints one line per rollout pair and a summary per verb;
writes BENCH_OUT/scene_recall.json.
"""
import json, sys, numpy as np, torch
torch.set_num_threads(1)
from icrt.sim.metaworld import (MetaWorldSim, parse_icl_task, icl_env_goal, icl_task_name, icl_distance, _icl_rollout,
                                _IclPrompts, ICL_VERBS)
from icrt.inference import ICRTPolicy
from icrt.bench.metaworld import SimPolicy
out, N = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
meta = json.load(open(f'{out}/data/metaworld_meta.json'))
pol = SimPolicy(ICRTPolicy.from_run(f'{out}/train/run', device='cpu'), 120)
sims = {v: MetaWorldSim(icl_task_name(v, [0, 0.85, 0.1]), meta['image_size'], meta['cameras']) for v in ICL_VERBS}
prompts = _IclPrompts(sims, meta['extra_steps'], meta['min_len'])
res = {}
for v in ICL_VERBS:
    eps = [(n, m) for n, m in meta['episodes'].items() if m['task'].startswith(v + '@') and n.endswith('_episode_0')][:N]
    goals = np.stack([parse_icl_task(m['task'])[1] for _, m in eps])
    allg = np.stack([parse_icl_task(t)[1] for t in meta['tasks'] if t.startswith(v + '@')])
    rows = []
    for i, (n, m) in enumerate(eps):
        gE = goals[i]; d = icl_distance(v, allg, gE); gF = allg[np.argmax(d)] if d.max() < 0.1 else allg[d >= 0.1][i % int((d >= 0.1).sum())]
        eE, eF = icl_env_goal(v, gE), icl_env_goal(v, gF)
        sim = sims[v].set_task(m['task']); rv = np.array(m['rand_vec'])
        own = _icl_rollout(sim, pol, rv, prompts(v, gE, (77, i), 1), eE, eE, 120, 10)
        sim = sims[v].set_task(m['task'])
        oth = _icl_rollout(sim, pol, rv, prompts(v, gF, (78, i), 1), eE, eF, 120, 10)
        rows.append(dict(own_success=own['success'], own_err=own['error'], other_to_scene_goal=oth['error'],
                         other_to_prompt_goal=oth['prompt_error'], goal_gap=float(np.linalg.norm(eE - eF)),
                         end=oth['end'], gE=eE.tolist(), gF=eF.tolist()))
        print(v, i, {k: (round(x, 3) if isinstance(x, float) else x) for k, x in rows[-1].items() if k not in ('end', 'gE', 'gF')}, flush=True)
    res[v] = r = rows
    print(f"== {v}: own prompt success {sum(x['own_success'] for x in r)}/{len(r)}, own err {100*np.mean([x['own_err'] for x in r]):.1f} cm; "
          f"other prompt: end {100*np.mean([x['other_to_scene_goal'] for x in r]):.1f} cm from the scene's (training) goal, "
          f"{100*np.mean([x['other_to_prompt_goal'] for x in r]):.1f} cm from the prompted goal (goals {100*np.mean([x['goal_gap'] for x in r]):.1f} cm apart); "
          f"closer to the scene's goal in {sum(x['other_to_scene_goal'] < x['other_to_prompt_goal'] for x in r)}/{len(r)}", flush=True)
json.dump(res, open(f'{out}/scene_recall.json', 'w'), indent=1)
