"""The crawl data source: pages made from the address's path, no network.

It streams as a real crawler does: one ``processing`` message per page found so far, then one
``completed`` message with every page."""

from collections.abc import Generator, Mapping
from typing import Any
from urllib.parse import urlsplit

from dify_plugin.entities.datasource import WebsiteCrawlMessage, WebSiteInfo, WebSiteInfoDetail
from dify_plugin.interfaces.datasource.website import WebsiteCrawlDatasource


class CrawlDatasource(WebsiteCrawlDatasource):
    def _get_website_crawl(
        self, datasource_parameters: Mapping[str, Any]
    ) -> Generator[WebsiteCrawlMessage, None, None]:
        url = str(datasource_parameters["url"])
        limit = int(datasource_parameters.get("limit") or 10)
        segments = [s for s in urlsplit(url).path.split("/") if s][:limit] or ["index"]
        pages = [
            WebSiteInfoDetail(
                source_url=f"{url}#{n}", content=f"page {s}", title=s, description=f"segment {n} of {url}"
            )
            for n, s in enumerate(segments, 1)
        ]
        for done in range(1, len(pages)):
            yield self.create_crawl_message(
                WebSiteInfo(status="processing", web_info_list=pages[:done], total=len(pages), completed=done)
            )
        yield self.create_crawl_message(
            WebSiteInfo(status="completed", web_info_list=pages, total=len(pages), completed=len(pages))
        )
