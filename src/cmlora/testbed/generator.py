"""Images of testbed jobs: the mini world's compositions and the generator a sweep calls.

A sweep job names a composition, a method label with its options, and a seed; the generator keeps
one composition's LoRAs loaded across consecutive jobs and builds one ``GenerationRequest`` per
batch of seeds."""

from __future__ import annotations

from ..methods import reads_profile
from ..request import GenerationRecord, GenerationRequest


def mini_compositions(sizes: tuple[int, ...] = (2, 3, 4, 5)) -> list:
    """The mini world's compositions of these sizes (240 for N = 2..5), with its prompts."""
    from .. import mini
    from ..testbed.compositions import enumerate_compositions
    from ..testbed.info import parse_info

    info = parse_info(mini.info(), source="mini_lora_info.json")
    prompts = mini.prompts()
    return enumerate_compositions(
        info,
        sizes,
        style="mini",
        base_prompt=prompts["prompt"],
        negative_prompt=prompts.get("negative_prompt", ""),
    )


class CompositionGenerator:
    """Makes the image of a sweep job; keeps one composition's LoRAs loaded across its jobs.

    ``methods`` maps a job's method label to (method, variant); the job carries its options.
    """

    def __init__(
        self,
        base,
        methods: dict[str, tuple[str, str | None]],
        defaults: dict,
        lora_path,
        profile=None,
        allow_partial: bool = False,
        allow_pickle: bool = False,
        batch_calls: bool = True,
    ):
        self.base, self.methods, self.defaults, self.lora_path = base, methods, defaults, lora_path
        self.batch_calls = batch_calls
        self.profile, self.allow_partial, self.allow_pickle = profile, allow_partial, allow_pickle
        self._composition: str | None = None
        self._composer = None

    def _composer_for(self, comp):
        from ..api import Composer
        from ..loras import LoRA

        if self._composition != comp.id:
            self.close()
            loras = [
                LoRA(self.lora_path(e), category=e.category, name=e.id, triggers=e.trigger)
                for e in comp.loras
            ]
            self._composer = Composer(
                self.base.pipe,
                loras,
                allow_partial=self.allow_partial,
                allow_pickle=self.allow_pickle,
                model_name=self.base.name,
            )
            self._composition = comp.id
        return self._composer

    def __call__(self, job):
        return self.many([job])[0]

    def many(self, jobs) -> list:
        """Jobs that differ only in their seed, denoised as one batch (``run_sweep``'s batch_size)."""
        job = jobs[0]
        method, variant = self.methods[job.method]
        d = self.defaults
        composer = self._composer_for(job.composition)
        # a profile orders the LoRAs of the methods that read one; the others run without it
        files = [lora.path for lora in composer.loras]
        given = self.profile if reads_profile(method, variant) else None
        profile = self.base.profile_for(method, variant, files, job.method_options, given)
        request = GenerationRequest(
            loras=composer.loras,
            prompt=job.composition.prompt,
            method=method,
            variant=variant,
            options=job.method_options,
            negative_prompt=job.composition.negative_prompt,
            steps=d["steps"],
            guidance_scale=d["guidance"],
            height=d["height"],
            width=d["width"],
            seeds=tuple(j.seed for j in jobs),
            lora_scale=d["lora_scale"],
            profile=profile,
            batch_calls=self.batch_calls,
            batch_size=len(jobs),
        )
        result = composer.run(request, progress=False)
        return [
            (image, sweep_record(record)) for image, record in zip(result.images, result.records, strict=True)
        ]

    def close(self) -> None:
        if self._composer is not None:
            self._composer.close()
        self._composer, self._composition = None, None


def sweep_record(record: GenerationRecord) -> dict:
    """A sweep's record of an image: the core's record without the job's own fields (prompt,
    negative prompt, seed: the job holds them), with the LoRAs and method under the names the run
    folder format has always used."""
    row = record.as_dict()
    for key in ("prompt", "negative_prompt", "seed"):
        row.pop(key)
    row["lora_files"] = row.pop("loras")
    row["method_name"] = row.pop("method")
    return row
