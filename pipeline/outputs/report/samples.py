"""The rows the report's galleries draw, read in bounded numbers: the most crowded images come from
the shard summaries, the random and the flagged samples from the scanned shards plus a few others
chosen pseudo-randomly (repeatable with --seed), and the objects and images rows of the picks from
the parts that hold them. A mixin of stats.RunStats, whose connection, views and shards it uses.
"""
from __future__ import annotations

import hashlib

from pipeline.outputs.columns import FLAG_REASONS, QA_COLUMNS, UNLABELED, normalize_objects
from pipeline.outputs.report.summaries import TOP_IMAGES

# The samples are drawn from the scanned shards and this many summarized shards per picture (chosen
# pseudo-randomly, repeatable with --seed): a few rows per picture, however large the run; a run of
# fewer shards is sampled whole, so its picks are those of a scan.
POOL_SHARDS_PER_PICK = 4


def stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".parquet")


def order(names, seed: int) -> list[str]:
    """Shards in a repeatable pseudo-random order (per --seed), for the samples."""
    return sorted(names, key=lambda n: hashlib.md5(f"{n}:{seed}".encode()).hexdigest())


class GalleryRows:
    """The galleries' reads (RunStats provides ``con``, ``run``, ``options``, ``shards``, ``scanned``,
    ``image_parts``, ``object_parts``, ``object_columns``, ``review``, ``sink_layout`` and ``part_of``)."""

    def gallery_picks(self) -> list[dict]:
        """The most crowded images (up to TOP_IMAGES, from the summaries), then a repeatable pseudo-random
        sample of the other ok images: of the scanned shards and of a few others (``_sample_shards``)."""
        k = self.options.gallery
        if k <= 0:
            return []
        crowded = self.rows("SELECT image_id, uri, width, height, bin, shard FROM m WHERE kind = 'crowded' "
                            "ORDER BY bin DESC, image_id LIMIT ?", [min((k + 1) // 2, TOP_IMAGES)])
        taken = [r[0] for r in crowded]
        chosen = self._sample_shards(lambda s: s.ok, POOL_SHARDS_PER_PICK * (k - len(crowded)))
        pool = self._read_parts("images", chosen, ["image_id", "uri", "width", "height", "num_objects"], "status = 'ok'")
        self.con.register("image_pool", pool)
        rest = self.rows(
            "SELECT image_id, uri, width, height, n, NULL AS shard FROM per_image WHERE NOT list_contains($1, image_id) UNION ALL "
            "SELECT image_id, uri, width, height, num_objects AS n, shard FROM image_pool WHERE NOT list_contains($1, image_id) "
            "ORDER BY md5(image_id || $2) LIMIT $3", [taken, str(self.options.seed), k - len(crowded)]
        )
        keys = ("image_id", "uri", "width", "height", "n")
        for row in [*crowded, *rest]:
            if row[5] is not None:
                self.part_of[row[0]] = row[5]
        return [dict(zip(keys, r[:5]), why="most objects") for r in crowded] + [dict(zip(keys, r[:5]), why="random") for r in rest]

    def flagged_picks(self, k: int) -> list[tuple[str, int]]:
        """Up to ``k`` flagged objects (image_id, object_id) for the quality gallery: taken in turn from each
        reason, pseudo-randomly (repeatable with --seed), so every reason is shown; from the scanned shards
        and enough others to offer ``k`` objects of each reason."""
        if k <= 0 or not self.qa_recorded:
            return []
        # 4k shards (as the gallery's random sample), then more while a reason has fewer than k objects in the pool.
        need = {r: k for r in {r for s in self.shards.values() for r in s.reasons}}
        chosen = []
        for name in order([n for n, s in self.shards.items() if s.flagged], self.options.seed):
            reasons = self.shards[name].reasons
            if len(chosen) >= POOL_SHARDS_PER_PICK * k and not any(need.get(r, 0) > 0 for r in reasons):
                continue
            chosen.append(name)
            for r, n in reasons.items():
                need[r] -= n
            if len(chosen) >= POOL_SHARDS_PER_PICK * k and all(v <= 0 for v in need.values()):
                break
        pool = self._read_parts("objects", chosen, ["image_id", "object_id", "flags"], f"needs_review AND {self.run.counted_sql()}")
        self.con.register("flag_pool", pool)
        rows = self.rows(
            "SELECT image_id, object_id, r, shard, row_number() OVER (PARTITION BY r ORDER BY md5(image_id || ':' || object_id || ?)) AS rn "
            "FROM (SELECT image_id, object_id, unnest(flags) AS r, NULL AS shard FROM objects WHERE needs_review "
            "UNION ALL SELECT image_id, object_id, unnest(flags) AS r, shard FROM flag_pool) ORDER BY rn, r LIMIT ?",
            [str(self.options.seed), k * len(FLAG_REASONS)],
        )
        picks: list[tuple[str, int]] = []
        for image_id, object_id, _, shard, _ in rows:
            if (image_id, object_id) not in picks:
                picks.append((image_id, int(object_id)))
                if shard is not None:
                    self.part_of[image_id] = shard
            if len(picks) == k:
                break
        return picks

    def _sample_shards(self, weight, count: int) -> list[str]:
        """Up to ``count`` summarized shards with ``weight(shard) > 0``, in a repeatable pseudo-random order."""
        if count <= 0:
            return []
        return order([n for n, s in self.shards.items() if weight(s) > 0], self.options.seed)[:count]

    def _read_parts(self, table: str, shards: list[str], columns: list[str], where: str):
        """Some rows of a few shards' parts, with their ``shard`` (bounded: the galleries' pools)."""
        import pyarrow as pa

        from pipeline.outputs.columns import normalized_columns_sql

        parts = self.image_parts if table == "images" else self.object_parts
        normalised = "" if table == "images" else normalized_columns_sql(self.object_columns)
        tables = [pa.table({**{c: pa.array([], self._type(table, c)) for c in columns}, "shard": pa.array([], pa.string())})]
        for shard in shards:
            if shard not in parts:
                continue
            self.con.register("one_part", self.run.dataset_of(table, [parts[shard]]))
            got = self.con.sql(f"SELECT {', '.join(columns)} FROM (SELECT *{normalised} FROM one_part) WHERE {where}").to_arrow_table()
            tables.append(got.cast(tables[0].schema.remove(len(columns))).append_column("shard", pa.array([shard] * got.num_rows, pa.string())))
        return pa.concat_tables(tables)

    def _type(self, table: str, column: str):
        schema = self.run.schema(table)
        if column in schema.names:
            return schema.field(column).type
        return QA_COLUMNS[column]

    def _locate(self, image_ids: list[str]) -> dict[str, str]:
        """image_id -> its shard: known for the images the galleries picked from summaries or pools;
        the others are in the scanned shards (their images parts are searched)."""
        import pyarrow.compute as pc

        found = {i: self.part_of[i] for i in image_ids if i in self.part_of}
        missing = [i for i in image_ids if i not in found]
        paths = [self.image_parts[s] for s in self.scanned]
        if missing and paths:
            scan = self.run.dataset_of("images", paths).scanner(columns=["image_id"], filter=pc.field("image_id").isin(missing))
            for b in scan.scan_batches():
                for image_id in b.record_batch.column(0).to_pylist():
                    found[image_id] = stem(b.fragment.path)
        return found

    def image_rows(self, image_ids: list[str]) -> dict[str, tuple]:
        """image_id -> (image_id, uri, width, height), read from the parts that hold these images only."""
        import pyarrow.compute as pc

        where = self._locate(image_ids)
        paths = sorted({self.image_parts[s] for s in where.values()})
        if not paths:
            return {}
        table = self.run.dataset_of("images", paths).to_table(columns=["image_id", "uri", "width", "height"],
                                                               filter=pc.field("image_id").isin(image_ids))
        return {r["image_id"]: (r["image_id"], r["uri"], r["width"], r["height"]) for r in table.to_pylist()}

    def objects_of(self, image_ids: list[str]) -> dict[str, list[dict]]:
        """The gallery images' objects. Reads only the objects parts of the shards that hold these images
        (the sink writes both under one name), not the whole objects table."""
        import pyarrow.compute as pc

        out: dict[str, list[dict]] = {i: [] for i in image_ids}
        if not image_ids or not self.run.object_files:
            return out
        wanted = pc.field("image_id").isin(image_ids)
        if self.sink_layout:
            paths = sorted({self.object_parts[s] for s in self._locate(image_ids).values() if s in self.object_parts})
        else:  # not the sink's layout: filter the whole table instead
            paths = self.run.object_files
        table = normalize_objects(self.run.dataset_of("objects", paths).to_table(filter=wanted))
        # The same rows the exports give: normalised, reviewed (outputs/decisions.py), then the user's filters.
        filt = self.options.filter
        shown = self.run.counted_expression(filt.include_duplicates)
        table = self.review.apply(table, shown, filt.include_duplicates) if self.review else (table if shown is None else table.filter(shown))
        if filt.expression() is not None:
            table = table.filter(filt.expression())
        columns = ["image_id", "object_id", "class_id", "class_name", "det_score", "mask_score", "box", "area", "mask",
                   *QA_COLUMNS, "review", "source", "track_id"]
        table = table.select([c for c in columns if c in table.column_names])
        for row in table.sort_by([("image_id", "ascending"), ("object_id", "ascending")]).to_pylist():
            row["class_name"] = row["class_name"] if row["class_name"] is not None else UNLABELED
            out[row["image_id"]].append(row)
        return out
