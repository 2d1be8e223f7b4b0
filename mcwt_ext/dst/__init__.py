"""Dynamic sparse training (RigL, Evci et al. 2020; SET, Mocanu et al. 2018): one training whose
masks change on a schedule, at exact per-layer counts.

    rule.py       the update: cosine drop fraction, one layer's drop-and-grow (pure functions)
    schedule.py   when it runs inside training (the step hook of mcwt_ext.train), resume, the API
"""
from .rule import drop_and_grow, drop_count, drop_fraction
from .schedule import DST_METHODS, DstConfig, MaskSchedule, final_masks, random_start, train_dst

__all__ = ["drop_and_grow", "drop_count", "drop_fraction", "DST_METHODS", "DstConfig", "MaskSchedule",
           "final_masks", "random_start", "train_dst"]
