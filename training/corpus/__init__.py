"""The living corpus: documents stored with their changes numbered (`store`), BM25 segments that take
upserts and deletes (`bm25`), the indexer that applies changes (`indexer`) and the readers of an
application's files (`files`). Query-time search over all of it is `training.ranking.first_stage`."""
