"""The parts of ``python -m jobs.report``: reading runs (``runs``), aggregating metric rows the papers' way
(``aggregates``), laying them out as the papers' tables (``tables``), the heatmap grids (``grids``), the
self-contained HTML page (``page``) and its headless Chromium screenshot (``screenshot``)."""
