"""CoDistill with its downsampling ranked by r instead of r~: an arm added after the comparison had been read
(experiments/README.md, section 4), to separate the two ways the KD term enters the small model's update. Which G of
the M rollouts are kept is decided by the reward r alone (ties by sample order, as GRPO's downsampling); the kept
ones still get A~ = r~ - mean(r~) with the KD term of Eq. (6), and the large model its A of Eq. (3), as CoDistill.
Everything else is `codistill_grpo.py` unchanged: this script only gives downsample() r = r~ - alpha * KD. Its
runs' args.json is CoDistill's, so `eval.py --runs` would group them with CoDistill runs of the same flags: keep them
in a folder of their own and give paired.py the folder.

    python experiments/rank_by_r.py --preset tiny --seed 1 --output_dir runs/cmp/codistill-rank-r/1
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codistill_grpo as cg  # noqa: E402

last = {}  # the KD term of the iteration's M rollouts, (B*M,), as the loop computed it


def kd_reward(*a, **k):
    last["kd"] = cg_kd_reward(*a, **k)
    return last["kd"]


def downsample(r_kd, G):  # (B, M) r~ -> kept indices (B, G), ranked by r = r~ - alpha * KD
    return cg_downsample(r_kd - last["alpha"] * last["kd"].view(r_kd.shape), G)


def parse_args(argv):
    args = cg_parse_args(argv)
    if args.algo != "codistill" or args.kd_form != "reward":
        sys.exit("error: rank_by_r.py is for --algo codistill --kd_form reward")
    last["alpha"] = args.alpha
    return args


cg_kd_reward, cg_downsample, cg_parse_args = cg.kd_reward, cg.downsample, cg.parse_args
cg.kd_reward, cg.downsample, cg.parse_args = kd_reward, downsample, parse_args

if __name__ == "__main__":
    cg.main(sys.argv[1:])
