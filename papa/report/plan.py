"""What a config renders and which runs that needs, checked up front: the (experiment, variant) pairs some table or
figure shows, for every seed (every experiment x variant x seed for a config with neither)."""

from papa.config import known_experiment
from papa.errors import PapaError
from papa.report import paper
from papa.report.tables import DATASETS, OWN_VARIANT, cell_experiment, cell_variant, columns, row_experiments


def table_runs(table: dict, variants: list[str]) -> set[tuple[str, str]]:
    """(experiment, variant) pairs whose metrics fill a table."""
    return {(e, v) for row in table["rows"] for header, (variant, _) in columns(table, variants, row).items()
            if (v := cell_variant(row, variant)) is not None and (e := cell_experiment(row, header)) is not None}


def figure_runs(figure: dict, variants: list[str]) -> set[tuple[str, str]]:
    """(experiment, variant) pairs a figure plots."""
    if figure.get("lines"):
        return {(line["experiment"], line["variant"]) for line in figure["lines"]}
    experiments = figure.get("experiments") or [figure["experiment"]]
    return {(e, v) for e in experiments for v in figure.get("variants") or variants}


def similarity_runs(config: dict) -> list[tuple[str, str]]:
    """(experiment, variant) pairs whose similarity.json a ``similarity`` table shows, sorted."""
    return sorted(set().union(*(table_runs(t, config["variants"]) for t in config["tables"]
                                if t["layout"] == "similarity")))


def runs(config: dict) -> list[tuple[str, str]]:
    """Every (experiment, variant) pair to train, sorted."""
    variants = config["variants"]
    if not config["tables"] and not config["figures"]:
        return sorted({(e, v) for e in config["experiments"] for v in variants})
    return sorted(set().union(*(table_runs(t, variants) for t in config["tables"]),
                              *(figure_runs(f, variants) for f in config["figures"])))


def check(config: dict, where: str = "config") -> None:
    """Cross-entry rules a schema cannot say; PapaError naming the offending key."""
    experiments, variants = config["experiments"], config["variants"]
    names = {}
    for kind in ("tables", "figures"):
        for i, entry in enumerate(config[kind]):
            key = f"{kind}.{i}"
            if (first := names.setdefault(entry["name"], key)) != key:
                raise PapaError(f"{where}: {key}.name: {entry['name']!r} already names {first}")
            if unknown := [v for v in entry.get("variants") or [] if v not in variants]:
                raise PapaError(f"{where}: {key}.variants: {unknown[0]!r} is not in the config's variants")
    for i, table in enumerate(config["tables"]):
        wide = table["layout"] == "side_by_side"
        by_column = table["layout"] == DATASETS
        labels = set()
        for j, row in enumerate(table["rows"]):
            key = f"tables.{i}.rows.{j}"
            if wide != ("columns" in row):
                raise PapaError(f"{where}: {key}.columns: " + ("required by the side_by_side layout" if wide else
                                                               "only the side_by_side layout has column groups"))
            cell = (row["label"], row.get("columns"))
            if cell in labels:
                what = f"{row['label']!r} with columns {row['columns']!r}" if wide else repr(row["label"])
                raise PapaError(f"{where}: {key}.label: {what} repeats in table {table['name']!r}")
            labels.add(cell)
            if by_column != ("experiments" in row) or "experiment" in row and "experiments" in row:
                wanted = "experiments (a {column: experiment} mapping)" if by_column else "experiment"
                raise PapaError(f"{where}: {key}: the {table['layout']} layout takes {wanted}")
            for e in row_experiments(row):
                known_experiment(e, experiments, f"{where}: {key}.experiment{'s' if by_column else ''}")
            if table["layout"] in OWN_VARIANT and "variant" not in row:
                raise PapaError(f"{where}: {key}.variant: required by the {table['layout']} layout")
            if (table["layout"] == "segmentation") != ("model" in row):
                raise PapaError(f"{where}: {key}.model: " + ("only the segmentation layout takes it" if "model" in row
                                                             else "required by the segmentation layout"))
            if row.get("variant", variants[0]) not in variants:
                raise PapaError(f"{where}: {key}.variant: {row['variant']!r} is not in the config's variants")
        if table.get("paper") and table["paper"] not in paper.available():
            known = ", ".join(paper.available()) or "none"
            raise PapaError(f"{where}: tables.{i}.paper: no papa/report/paper/{table['paper']}.csv ({known})")
    for i, figure in enumerate(config["figures"]):
        for e in figure.get("experiments") or [line["experiment"] for line in figure.get("lines") or []] or [
                figure.get("experiment")]:
            known_experiment(e, experiments, f"{where}: figures.{i}.experiment")
