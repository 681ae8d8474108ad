"""Offline estimate: HR@10 when N of the 10 slots go to the best never-clicked items."""
import sys, numpy as np
from trainer import evaluate as E
from trainer import metrics as M
LEARNER = []
orig_make = E.make_method
def mm(*a, **k):
    ad = orig_make(*a, **k); LEARNER.append(ad.learner); return ad
E.make_method = mm
stats = {n: [0, 0, 0, 0] for n in (0, 1, 2, 3)}  # hits all, n all, hits cold, n cold
orig_rank = E.rank_targets
def rt(scores, target, history, **kw):
    s = scores.copy()
    ranks = orig_rank(scores, target, history, **kw)  # masks scores in place
    s = scores  # masked
    cold = np.zeros(s.shape[1], bool)
    cr = LEARNER[-1].cold_rows(s.shape[1]); cold[cr] = True
    for r in range(len(target)):
        t = target[r]
        if t < 0: continue
        row = s[r]
        order = np.argpartition(-row, 10)[:10]
        order = order[np.argsort(-row[order], kind="stable")]
        rc = np.where(cold, row, -np.inf)
        corder = np.argpartition(-rc, 13)[:13]
        corder = corder[np.argsort(-rc[corder], kind="stable")]
        is_cold_t = cold[t]
        for n in stats:
            top = list(order[: 10 - n])
            if n:
                c = [j for j in corder if np.isfinite(rc[j]) and j not in top][:n]
                top += c
            hit = t in top and np.isfinite(row[t])
            st = stats[n]; st[0] += hit; st[1] += 1
            if is_cold_t: st[2] += hit; st[3] += 1
    return ranks
E.rank_targets = rt
D = '/work/shared/data/ml-latest-small'
E.main(['--dataset', 'movielens', f'{D}/ratings.csv', '--catalogue', f'{D}/movies.csv', '--methods',
        'apr+cooc', '--content', 'on', '--until', sys.argv[1], '--seeds', '1', '--no-progress', '--out', '/tmp/cs/slots'])
for n, (h, t, hc, tc) in stats.items():
    print(f"reserved {n}: HR@10 {h/t:.4f} (n {t}), cold-target HR@10 {hc/max(tc,1):.4f} (n {tc})")
