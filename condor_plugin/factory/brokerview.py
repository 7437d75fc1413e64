"""What the factory asks the broker: waiting jobs that fit a glidein, its glideins' pilots, the site's state.

    view = BrokerView(admin_client, site="SITE-A", address="broker:7443", ca=ca, factory="f1")
    view.waiting(GlideinSlot(cores=1, memory_mb=2048, disk_mb=4096, time_s=6 * 3600, site="SITE-A"))
    view.pilots(seen_within_s=7200)          # the broker's pilot records (jobs matched, end reason, serial)
    view.site_state()                         # 'enabled', 'draining', 'disabled' or 'unknown'

Waiting jobs come from AdminService.ListAllJobs (WAITING), checked here
against the slot a glidein of this factory offers (`GlideinSlot.unmet`, the
broker's own matching rule: broker.store.classes.RequirementClass.fits).
Pilot records come from AdminService.ListPilots; the factory finds its
glideins' pilots there by the serial of the agent certificate it minted for
their batch.

The site's state comes from AdminService.ListSites (a site the broker has
no record of is enabled; a broker older than ListSites: 'unknown', which
the policy treats as open). Before its first question the view checks that
the factory's CA (which signs its glideins' agent tokens) is the one that
issued the admin token the broker accepts: otherwise every glidein's token
would be refused, and the cycle stops with the fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature

from pilot.api.client import BrokerError
from pilot.api.states import JobState
from pilot.errors import SplitpilotError

if TYPE_CHECKING:   # the factory is handed the broker's CA by its caller (apps/)
    from broker.ca import CertificateAuthority

#: Time a glidein spends before its agent first asks for work (venv, self-tests), and the agent's own
#: reserve (its Stop deadline at the slot's end): a job needing more than lifetime minus this never fits.
STARTUP_MARGIN_S = 180
#: Waiting jobs read per ListAllJobs page.
PAGE = 5000


@dataclass(frozen=True)
class GlideinSlot:
    """What one glidein of this factory offers its jobs (as its agent will offer it to the broker)."""

    cores: int
    memory_mb: int
    disk_mb: int
    time_s: int                     # the glidein's lifetime, less STARTUP_MARGIN_S
    site: str
    containers: bool = True         # False when its container policy is 'off'
    platforms: tuple[str, ...] = ()

    def unmet(self, requirements) -> list[str]:
        """The requirements (job.v1.Requirements) this slot does not meet, as 'name wanted > offered'."""
        r = requirements
        problems = []
        if max(1, r.cores) > self.cores:
            problems.append(f"cores {r.cores} > {self.cores}")
        if r.memory_mb > self.memory_mb:
            problems.append(f"memory_mb {r.memory_mb} > {self.memory_mb}")
        if r.disk_mb > self.disk_mb:
            problems.append(f"disk_mb {r.disk_mb} > {self.disk_mb}")
        if r.walltime_s > self.time_s:
            problems.append(f"walltime_s {r.walltime_s} > {self.time_s} (the glidein lifetime less "
                            f"{STARTUP_MARGIN_S} s)")
        if r.sites_allowed and self.site not in r.sites_allowed:
            problems.append(f"sites_allowed does not name {self.site}")
        if self.site in r.sites_denied:
            problems.append(f"sites_denied names {self.site}")
        if r.platform and r.platform not in self.platforms:
            problems.append(f"platform {r.platform!r} not offered")
        if r.container_image and not self.containers:
            problems.append("a container (the glideins run with --container-policy off)")
        return problems


@dataclass(frozen=True)
class Waiting:
    fit: int
    unfit: int = 0
    #: The most common reason the unfit jobs do not fit, with how many it concerns.
    reason: str = ""


def count_waiting(specs: Iterable, slot: GlideinSlot, site: str) -> Waiting:
    """Split the waiting jobs' SPECS (job.v1.JobSpec) of SITE into those a glidein fits and the others.
    Jobs that may not run at SITE at all are not the site's: counted in neither."""
    fit = 0
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for spec in specs:
        r = spec.requirements
        if (r.sites_allowed and site not in r.sites_allowed) or site in r.sites_denied:
            continue
        unmet = slot.unmet(r)
        if not unmet:
            fit += 1
            continue
        name = unmet[0].split(" ")[0]
        counts[name] += 1
        examples.setdefault(name, unmet[0])
    if not counts:
        return Waiting(fit)
    top, many = counts.most_common(1)[0]
    unfit = sum(counts.values())
    others = f"; {unfit - many} for other reasons" if unfit > many else ""
    return Waiting(fit, unfit, f"{many} need {examples[top]}{others}")


class BrokerView:
    """The factory's questions to the broker, through an AdminClient."""

    def __init__(self, admin, site: str, *, address: str = "", ca: CertificateAuthority | None = None,
                 factory: str = "splitpilot") -> None:
        self.admin = admin
        self.site = site
        self.address = address or admin.address
        self.ca = ca
        self.factory = factory
        self._ca_checked = ca is None

    def waiting(self, slot: GlideinSlot) -> Waiting:
        specs, before = [], 0
        while True:
            listing = self.admin.list_all_jobs(states=[JobState.WAITING], limit=PAGE, before_job_id=before)
            specs += [job.spec for job in listing.jobs]
            if len(listing.jobs) < PAGE:
                return count_waiting(specs, slot, self.site)
            before = min(job.job_id for job in listing.jobs)

    def pilots(self, seen_within_s: int):
        return self.admin.list_pilots(seen_within_s=min(max(1, int(seen_within_s)), 2**32 - 1))

    def site_state(self) -> str:
        """'enabled', 'draining' or 'disabled' (AdminService.ListSites), or 'unknown' from a broker older
        than ListSites."""
        self._check_ca()
        try:
            sites = self.admin.list_sites()
        except BrokerError as exc:
            if exc.code.name == "UNIMPLEMENTED":
                return "unknown"
            raise SiteStateUnknown(f"could not read site {self.site}'s state (AdminService.ListSites): {exc}") \
                from None
        for site in sites:
            if site.site == self.site:
                return site.state
        return "enabled"   # no admin state and no pilot yet

    def _check_ca(self) -> None:
        """Refuse a factory CA that did not issue the admin token the broker accepts (checked once)."""
        if self._ca_checked or self.ca is None:
            return
        try:
            self.admin.certificate.verify_directly_issued_by(self.ca.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise SiteStateUnknown(
                f"the factory's --ca ({self.ca.certificate.subject.rfc4514_string()}) did not issue the admin "
                "token the broker accepts: the factory's --ca is not the broker's CA, and every glidein's agent "
                "token it signs would be refused; fix: point --ca at the broker's CA folder (the broker's "
                "--state-dir/ca), or use an admin token of the factory's CA") from None
        self._ca_checked = True


class SiteStateUnknown(SplitpilotError):
    """The factory could not ask the broker for its site's state (the cycle submits nothing)."""


__all__ = ["STARTUP_MARGIN_S", "BrokerView", "GlideinSlot", "SiteStateUnknown", "Waiting", "count_waiting"]
