"""Image-to-video and text-to-video sampling (not written yet: the pipeline issue).

It will run the official I2V / T2V pipelines from a Wan2.1 checkpoint directory in one step with a
distilled student (`--student`), or with the teacher's Euler + CFG baseline.
"""
