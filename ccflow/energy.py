"""Measure the energy and CO2 of a job with CodeCarbon's offline tracker and log it to MLflow.

Only one tracker runs per job, on the driver: Ray workers run no tracker of their own,
because parallel trackers on one machine would each count the whole machine. The tracker
runs in CodeCarbon's "machine" mode, so it counts every process on the machine, the Ray
workers included, and also any unrelated load running at the same time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_COUNTRY = "ITA"
"""ISO 3166-1 alpha-3 code of the electricity grid assumed for CO2 (Italy, where the
Fluorescent Neuronal Cells archive was published). Set it to the country the machine
runs in: CO2 per kWh differs several-fold between grids."""

EMISSIONS_FILE = "emissions.csv"
MEASURE_POWER_SECONDS = 5.0


@dataclass
class EnergyReport:
    """Energy and emissions of one tracked task, as measured by CodeCarbon.

    Energies are in kWh, emissions in kg CO2-equivalent, durations in seconds.
    """

    task_name: str
    emissions_kg: float
    energy_kwh: float
    cpu_kwh: float
    gpu_kwh: float
    ram_kwh: float
    duration_s: float
    country_iso_code: str
    emissions_csv: Path | None

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """Return the numbers as MLflow metric names and values, each name led by ``prefix``."""
        values = {
            "co2_kg": self.emissions_kg,
            "energy_kwh": self.energy_kwh,
            "cpu_energy_kwh": self.cpu_kwh,
            "gpu_energy_kwh": self.gpu_kwh,
            "ram_energy_kwh": self.ram_kwh,
            "energy_duration_s": self.duration_s,
        }
        return {f"{prefix}{name}": float(value) for name, value in values.items()}

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        values = asdict(self)
        values["emissions_csv"] = str(self.emissions_csv) if self.emissions_csv else None
        return values


class EnergyTracking:
    """Handle yielded by :func:`track_energy`; ``report`` is set when the block exits."""

    def __init__(self, task_name: str, country_iso_code: str, output_dir: Path) -> None:
        self.task_name = task_name
        self.country_iso_code = country_iso_code
        self.output_dir = output_dir
        self.report: EnergyReport | None = None


@contextmanager
def track_energy(
    task_name: str,
    output_dir: Path,
    country_iso_code: str = DEFAULT_COUNTRY,
    measure_power_secs: float = MEASURE_POWER_SECONDS,
) -> Iterator[EnergyTracking]:
    """Measure the energy and CO2 of the enclosed block with CodeCarbon, offline.

    Parameters
    ----------
    task_name : str
        Name of the task, written to the ``project_name`` column of the emissions CSV.
    output_dir : Path
        Folder for ``emissions.csv``; created when missing. CodeCarbon appends one row
        per tracked block.
    country_iso_code : str
        ISO 3166-1 alpha-3 code of the electricity grid, such as ``"ITA"`` or ``"USA"``.
        It sets the CO2 intensity per kWh; no network lookup is made.
    measure_power_secs : float
        Seconds between power readings.

    Yields
    ------
    EnergyTracking
        Its ``report`` holds the :class:`EnergyReport` once the block has exited,
        also when the block raised.

    Notes
    -----
    Without RAPL access (containers, most cloud machines) CodeCarbon estimates CPU power
    from the processor's TDP and the CPU load; GPU energy comes from NVML and is 0
    without an NVIDIA GPU. Treat the numbers as estimates.
    """
    country = _check_country(country_iso_code)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tracking = EnergyTracking(task_name, country, output_dir)
    tracker = _start_tracker(task_name, output_dir, country, measure_power_secs)
    started = time.monotonic()
    try:
        yield tracking
    finally:
        tracking.report = _stop_tracker(
            tracker, task_name, output_dir, country, time.monotonic() - started
        )
        logger.info(
            "%s used %.6f kWh, %.6f kg CO2-eq over %.1f s (grid %s)",
            task_name,
            tracking.report.energy_kwh,
            tracking.report.emissions_kg,
            tracking.report.duration_s,
            country,
        )


def log_energy(
    report: EnergyReport,
    *,
    prefix: str = "",
    client=None,
    run_id: str | None = None,
) -> None:
    """Log an energy report to an MLflow run as metrics, a tag and the emissions CSV.

    Metrics are ``{prefix}co2_kg``, ``{prefix}energy_kwh``, ``{prefix}cpu_energy_kwh``,
    ``{prefix}gpu_energy_kwh``, ``{prefix}ram_energy_kwh`` and
    ``{prefix}energy_duration_s``; the tag ``{prefix}energy_country`` contains the grid's
    country code, and the CSV goes under the artifact folder ``energy/``.

    Parameters
    ----------
    report : EnergyReport
        The report from :func:`track_energy`.
    prefix : str
        Put before every metric name, such as ``"count_"``; empty for training.
    client : mlflow.tracking.MlflowClient, optional
        Client to log with; together with ``run_id``. Without one, the active run of
        the ``mlflow`` fluent API is used.
    run_id : str, optional
        Run to log to when ``client`` is given.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if client is None and run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_energy needs an active MLflow run, or client and run_id.")
        run_id = active.info.run_id
    if run_id is None:
        raise ValueError("log_energy got a client but no run_id: pass the run to log to.")
    client = client or MlflowClient()

    timestamp = int(time.time() * 1000)
    from mlflow.entities import Metric

    metrics = [Metric(k, v, timestamp, 0) for k, v in report.to_metrics(prefix).items()]
    client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, f"{prefix}energy_country", report.country_iso_code)
    if report.emissions_csv is not None and report.emissions_csv.is_file():
        client.log_artifact(run_id, str(report.emissions_csv), artifact_path="energy")


def _check_country(code: str) -> str:
    code = (code or "").strip().upper()
    if len(code) != 3 or not code.isalpha():
        raise ValueError(
            f"Invalid country code {code!r}: use an ISO 3166-1 alpha-3 code such as "
            f"'{DEFAULT_COUNTRY}', 'USA' or 'FRA'."
        )
    return code


def _start_tracker(task_name: str, output_dir: Path, country: str, measure_power_secs: float):
    from codecarbon import OfflineEmissionsTracker

    # CodeCarbon logs every power reading at INFO through its own logger.
    logging.getLogger("codecarbon").setLevel(logging.WARNING)
    tracker = OfflineEmissionsTracker(
        project_name=task_name,
        country_iso_code=country,
        output_dir=str(output_dir),
        output_file=EMISSIONS_FILE,
        measure_power_secs=measure_power_secs,
        tracking_mode="machine",
        log_level="warning",
    )
    tracker.start()
    return tracker


def _stop_tracker(tracker, task_name: str, output_dir: Path, country: str, elapsed: float):
    tracker.stop()
    data = tracker.final_emissions_data
    csv_path = output_dir / EMISSIONS_FILE
    if data is None:
        # NOTE: CodeCarbon 3.3 leaves final_emissions_data unset when it failed to
        # measure; the job itself must not fail for that, so the report contains zeros.
        logger.warning("CodeCarbon returned no measurement for %s; energy logged as 0", task_name)
        return EnergyReport(task_name, 0.0, 0.0, 0.0, 0.0, 0.0, elapsed, country, None)
    return EnergyReport(
        task_name=task_name,
        emissions_kg=float(data.emissions),
        energy_kwh=float(data.energy_consumed),
        cpu_kwh=float(data.cpu_energy),
        gpu_kwh=float(data.gpu_energy),
        ram_kwh=float(data.ram_energy),
        duration_s=float(data.duration),
        country_iso_code=country,
        emissions_csv=csv_path if csv_path.is_file() else None,
    )
