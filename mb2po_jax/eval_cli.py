"""`mb2po-eval`: a trained policy of a workdir, evaluated in the environment it was trained for.

    mb2po-eval runs/hmr                              # seed 0's policy of the newest finished stage
    mb2po-eval runs/hmr --stage awac --seed 1 --episodes 20
    mb2po-eval runs/hmr --video hopper.mp4           # and one episode rendered to a video

Prints one JSON line on stdout: workdir, env, stage, seed, step, finished, episodes, return (mean over the
episodes), return_std, normalized_score (of the mean return), returns and lengths (per episode), video;
progress goes to stderr. Episodes are reset with the seeds training's evaluations use, so `--episodes` equal
to the run's final evaluation's count (the default: its --final_eval_episodes, else --eval_episodes)
reproduces that seed's final evaluation of the stage.

--video renders the first episode again through MuJoCo's offscreen renderer and writes it with imageio:
headless, it needs MUJOCO_GL=egl (libEGL with a GPU driver, or Mesa's; the default here when MUJOCO_GL is
unset) or MUJOCO_GL=osmesa (Debian: apt-get install libosmesa6), and `pip install -e ".[video]"` (imageio,
imageio-ffmpeg) for .mp4. Where rendering is unavailable it prints one `error: --video ...` line, exit 1,
before evaluating anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from mb2po_jax import config as config_lib
from mb2po_jax.errors import ConfigError, Mb2poError

EVAL_SEED_OFFSET = 10_000  # pipeline.Run._evaluate resets episodes from config seed + 10_000


class VideoError(Mb2poError):
    """--video cannot be written here (no offscreen rendering, or no video writer)."""


def _log(msg: str) -> None:
    print(f"mb2po-eval: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class VideoRecorder:
    """One episode's frames from `env_id` (render_mode="rgb_array") streamed into a video file. Opening it
    renders a first frame, so an unusable renderer or writer fails before any evaluation."""

    def __init__(self, env_id: str, path: str, max_episode_steps: int):
        self.path = path
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401 - imageio's ffmpeg writer (.mp4, .webm, .avi, ...)
        except ImportError as e:
            raise VideoError(f"--video needs imageio and imageio-ffmpeg ({_one_line(e)}); "
                             "pip install -e \".[video]\"") from None
        gl = os.environ.get("MUJOCO_GL", "")
        hint = ("headless rendering needs MUJOCO_GL=egl (libEGL with a GPU driver or Mesa) or MUJOCO_GL=osmesa "
                "(Debian: apt-get install libosmesa6)")
        from mb2po_jax.data.envs import make_env

        self.env = None
        try:
            self.env = make_env(env_id, max_episode_steps=max_episode_steps, render_mode="rgb_array",
                                disable_env_checker=True)
            self.env.reset(seed=0)
            frame = self.env.render()
            if not (isinstance(frame, np.ndarray) and frame.ndim == 3):
                raise RuntimeError(f"render() returned {type(frame).__name__}, not an RGB image")
        except Exception as e:  # noqa: BLE001 - GL libraries fail in many ways; all mean "no video here"
            self.close()
            cause = e.__cause__ if isinstance(e, Mb2poError) and e.__cause__ else e
            raise VideoError(f"--video: cannot render {env_id} offscreen with MUJOCO_GL={gl or '(unset)'} "
                             f"({_one_line(cause)}); {hint}") from None
        self.fps = int(self.env.metadata.get("render_fps") or 30)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            self.close()
            raise VideoError(f"--video {path}: directory {directory} does not exist")
        self._imageio = imageio

    def record(self, policy, reset_seed: int) -> int:
        """Runs one episode of the deterministic `policy` (obs [obs_dim] -> env action) from `reset_seed`,
        writing a frame per step (and the first). Returns the number of frames."""
        env = self.env
        obs, _ = env.reset(seed=reset_seed)
        frames = 0
        with warnings.catch_warnings():
            # imageio-ffmpeg starts ffmpeg (at the first frame) with fork + exec; Python warns about any fork
            # in a process running JAX's threads, harmless before an exec.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            try:
                with self._imageio.get_writer(self.path, fps=self.fps) as writer:
                    done = False
                    while True:
                        writer.append_data(env.render())
                        frames += 1
                        if done:
                            break
                        action = np.clip(np.asarray(policy(obs)), env.action_space.low, env.action_space.high)
                        obs, _, terminated, truncated, _ = env.step(action.astype(env.action_space.dtype))
                        done = terminated or truncated
            except (OSError, RuntimeError, ValueError) as e:  # an unknown extension, ffmpeg failing
                raise VideoError(f"--video {self.path}: cannot write the video ({_one_line(e)})") from None
        return frames

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mb2po-eval", description="Evaluate a trained policy of a mb2po-train workdir in its environment; "
                                       "prints one JSON line.")
    parser.add_argument("workdir", help="a mb2po-train --workdir")
    parser.add_argument("--stage", choices=("awac", "mb2po", "online"), help="default: the newest finished stage")
    parser.add_argument("--seed", type=int, default=0, help="which of the run's seeds (default 0)")
    parser.add_argument("--episodes", type=int, help="episodes (default: as many as the stage's final evaluation ran: "
                        "the count its checkpoint records, else the run's --final_eval_episodes, else "
                        "--eval_episodes)")
    parser.add_argument("--max_episode_steps", type=int, help="default: the run's --max_episode_steps")
    parser.add_argument("--video", metavar="OUT.mp4", help="also render the first episode to this file")
    args = parser.parse_args(argv)
    if args.video and "MUJOCO_GL" not in os.environ:
        os.environ["MUJOCO_GL"] = "egl"  # headless; read once, when mujoco is first imported (below)

    import jax

    from mb2po_jax import policy as policy_lib
    from mb2po_jax.data.envs import env_spaces
    from mb2po_jax.data import normalized_score
    from mb2po_jax.evaluation import evaluate

    recorder = None
    try:
        source = policy_lib.find_policy(args.workdir, args.stage, args.seed)
        cfg = source.config
        episodes = (args.episodes if args.episodes is not None
                    else int(config_lib.recorded_final_episodes(cfg, source.final) or 10))
        max_steps = (args.max_episode_steps if args.max_episode_steps is not None
                     else int(cfg.get("max_episode_steps", 1000)))
        if not 1 <= episodes <= 1000 or max_steps < 1:  # `evaluate` numbers reset seeds 1000 apart per seed
            raise ConfigError(f"--episodes must be in [1, 1000] and --max_episode_steps >= 1, got {episodes} "
                              f"and {max_steps}")
        if args.video:
            recorder = VideoRecorder(source.env_id, args.video, max_steps)
        unit = {"mb2po": "iteration", "online": "env_step"}.get(source.stage, "step")
        _log(f"seed {source.seed} of {source.workdir}, stage {source.stage} ({unit} {source.step}"
             f"{'' if source.finished else ', not finished'}), {source.env_id}: {episodes} episode(s) of at "
             f"most {max_steps} steps")
        started = time.perf_counter()
        agents = policy_lib.load_agents(source)  # [S]: this seed's row acts as training evaluates it
        act_fn = policy_lib.evaluation_act_fn(jax.tree.map(lambda x: x[source.seed:source.seed + 1], agents),
                                              env_spaces(source.env_id))  # obs [1, N, o] -> [1, N, a]
        reset_seed = int(cfg.get("seed", 0)) + EVAL_SEED_OFFSET
        result = evaluate(act_fn, source.env_id, num_seeds=1,
                          num_episodes=episodes, seed=reset_seed, max_episode_steps=max_steps,
                          first_seed_index=source.seed)
        returns = result.returns[0]
        score = float(normalized_score(source.env_id, returns.mean()))
        _log(f"return {returns.mean():.1f} +- {returns.std():.1f}, normalized {score:.1f} "
             f"({time.perf_counter() - started:.1f} s)")
        if recorder is not None:
            # Episode 0's reset seed (`evaluation`: seed + 1000 s + j): the video is the first episode above.
            one = lambda obs: act_fn(obs[None, None])[0, 0]  # obs [o] -> [a], as the episodes above acted
            frames = recorder.record(one, reset_seed + 1000 * source.seed)
            _log(f"wrote {args.video} ({frames} frames at {recorder.fps} fps)")
    except Mb2poError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if recorder is not None:
            recorder.close()
    print(json.dumps({
        "workdir": source.workdir, "env": source.env_id, "stage": source.stage, "seed": source.seed,
        "step": source.step, "finished": source.finished, "episodes": episodes,
        "max_episode_steps": max_steps, "return": float(returns.mean()), "return_std": float(returns.std()),
        "normalized_score": score, "returns": [float(r) for r in returns],
        "lengths": [int(n) for n in result.lengths[0]], "video": args.video,
    }))
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
