"""CoDistill with one of the two ways its KD term enters the small model's update switched off: arms added after the
comparison had been read (experiments/README.md, section 4). The KD term of Eq. (6) both ranks the M rollouts
(Sec. 3.3: keep the G/2 highest and G/2 lowest r~) and is paid in the advantage of the kept ones (A~ = r~ -
mean r~, Eq. 7). Everything else is `codistill_grpo.py` unchanged:

    rank-by-r   the M are ranked by r (ties by sample order, as GRPO's downsampling); A~ still holds the KD term
    rank-only   the M are ranked by r~ as in the paper; A~ = r - mean(r) over the kept (no KD term in it)

    python experiments/kd_parts.py rank-by-r --preset tiny --seed 1 --output_dir runs/cmp/codistill-rank-r/1

A run's args.json is CoDistill's, so `eval.py --runs` would group it with CoDistill runs of the same flags: keep
each variant in a folder of its own and give paired.py the folder.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402

VARIANTS = ("rank-by-r", "rank-only")
last = {}  # the KD term of the iteration's M rollouts, (B*M,), as the loop computed it; alpha


def kd_reward(*a, **k):
    last["kd"] = cg_kd_reward(*a, **k)
    return last["kd"]


def downsample_by_r(r_kd, G):  # (B, M) r~ -> kept indices (B, G), ranked by r = r~ - alpha * KD
    return cg_downsample(r_kd - last["alpha"] * last["kd"].view(r_kd.shape), G)


def roles_without_kd_in_advantage(args):
    who = cg_roles(args)
    who.kd_in_reward = False  # the loop then builds A~ from r over the kept rollouts; the ranking still uses r~
    return who


def parse_args(argv):
    args = cg_parse_args(argv)
    if args.algo != "codistill" or args.kd_form != "reward":
        sys.exit("error: kd_parts.py is for --algo codistill --kd_form reward")
    last["alpha"] = args.alpha
    return args


cg_kd_reward, cg_downsample, cg_roles, cg_parse_args = cg.kd_reward, cg.downsample, cg.roles, cg.parse_args

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(__doc__)
    cg.parse_args = parse_args
    if sys.argv[1] == "rank-by-r":
        cg.kd_reward, cg.downsample = kd_reward, downsample_by_r
    else:
        cg.roles = roles_without_kd_in_advantage
    cg.main(sys.argv[2:])
