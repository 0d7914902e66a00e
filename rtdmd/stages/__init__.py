"""The two trainers: ``ac_dmd`` (stage 1, AC-DMD distillation) and ``rtdmd`` (stage 2, reward tilting);
``common`` holds what they share."""
