"""Operations: Grafana dashboards generated from the metric catalog, job outcome reporting."""
