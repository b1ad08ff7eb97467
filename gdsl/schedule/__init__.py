"""The scheduler: a Program becomes a Plan of uTasks on vEUs in waves (see plan.py, scheduler.py)."""
from gdsl.schedule.plan import Plan  # noqa: F401
from gdsl.schedule.scheduler import schedule  # noqa: F401
